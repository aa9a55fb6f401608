# Helpers for VM scenarios (vmtest), sourced before /scenario.sh.
# Protocol lines go to the console and to the results channel, a second
# serial port that only this protocol writes to, so kernel messages on the
# console cannot split them.
VM_RESULTS=/dev/ttyS1

# vm_emit WORD ARGS...: print one protocol line "@@ WORD ARGS...".
vm_emit() {
	echo "@@ $*"
	echo "@@ $*" >"$VM_RESULTS"
}

# result NAME PASS|FAIL|SKIP [DETAIL...]: report one case. NAME has no spaces;
# DETAIL is the rest of the line.
result() {
	_vm_name=$1 _vm_status=$2
	shift 2
	vm_emit RESULT "$_vm_name" "$_vm_status" "$*"
}

# metric NAME VALUE: report a measurement (Result.Metrics).
metric() {
	vm_emit METRIC "$1" "$2"
}

# check NAME CMD [ARG...]: run CMD, print its output prefixed with "  [NAME] ",
# and report PASS if it exits 0, else FAIL with the exit status and the last
# line of output. Returns CMD's exit status.
check() {
	_vm_name=$1
	shift
	_vm_out=$("$@" 2>&1)
	_vm_rc=$?
	[ -z "$_vm_out" ] || printf '%s\n' "$_vm_out" | sed "s/^/  [$_vm_name] /"
	if [ "$_vm_rc" -eq 0 ]; then
		result "$_vm_name" PASS
	else
		result "$_vm_name" FAIL "exit $_vm_rc: $(printf '%s\n' "$_vm_out" | tail -n 1)"
	fi
	return "$_vm_rc"
}
