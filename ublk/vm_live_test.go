package ublk_test

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"strings"
	"testing"

	"ublkimg/internal/promtest"
	"ublkimg/vmtest"
)

// statsLiveScript: a qcow2 device with two queues and recovery. Its control
// socket; stats' request counts against fio's over a random read/write job
// (the JSON of both goes to the host); stats, list and the metrics
// endpoint (its page goes to the host too); then restart under fio verify
// on a mounted ext4: no error, a new server, a clean file system and image.
const statsLiveScript = `
pidof() { sed -n 's/.*"pid": \([0-9]*\),.*/\1/p' /run/ublkimg/ublkb$1.json; }
ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
ip link set lo up
check create ublkimg create -f qcow2 /tmp/s.qcow2 256M
dev=$(ublkimg attach --recovery --queues 2 /tmp/s.qcow2)
check attach test -b "$dev" || exit 1
check socket sh -c 'test -S /run/ublkimg/ublkb0.sock && test "$(stat -c %a /run/ublkimg/ublkb0.sock)" = 600'
metric stats_before "$(ublkimg stats --output json $dev | tr -d '\n')"
check fio-count fio --name=cnt --filename=$dev --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=16 \
	--numjobs=2 --offset_increment=64M --size=64M --io_size=12M --output-format=json --output=/tmp/fio.json
metric fio_json "$(tr -d '\n' </tmp/fio.json)"
metric stats_after "$(ublkimg stats --output json $dev | tr -d '\n')"
check stats-human sh -c "ublkimg stats $dev | grep -E '^ +all +write +[0-9]+'"
check stats-interval ublkimg stats --interval 200ms
check list-live sh -c "ublkimg list | grep '$dev' | awk '{print \$9, \$10, \$11}' | grep -Eq '^[0-9]+ [0-9]+ 0$'"
check list-json sh -c "ublkimg list --output json | grep -q '\"writes\": [1-9]'"
expect_fail stats-unknown "no such device served by ublkimg" ublkimg stats 5

ublkimg metrics --listen 127.0.0.1:9740 2>/tmp/metrics.err &
mpid=$!
i=0; while ! wget -qO /tmp/m.txt http://127.0.0.1:9740/metrics 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
check metrics-page grep -q '^ublkimg_requests_total{device="ublkb0"' /tmp/m.txt
metric prom "$(base64 -w0 /tmp/m.txt)"
kill $mpid

check mkfs mke2fs -q -F -t ext4 "$dev"
check mount mount "$dev" /mnt || exit 1
# 4096 writes at most 500 per second: still writing when the restart comes.
fio --name=rst --filename=/mnt/fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16M \
	--rate_iops=500 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=json --output=/tmp/rst.json &
fio=$!
sleep 2
old=$(pidof 0)
t0=$(ms)
check restart ublkimg restart "$dev"
metric restart_ms $(($(ms) - t0))
new=$(pidof 0)
check pid-changed test -n "$new" -a "$new" != "$old"
check old-gone sh -c "! kill -0 $old 2>/dev/null"
check stats-new-server ublkimg stats $dev
wait $fio
check restart-fio-verified test $? -eq 0
metric restart_fio_json "$(tr -d '\n' </tmp/rst.json)"
grep 'restarted:' /run/ublkimg/ublkb0.log
metric handover "$(grep 'restarted:' /run/ublkimg/ublkb0.log | tail -n 1)"
expect_fail restart-no-recovery "not attached with --recovery" sh -c 'd=$(ublkimg attach /tmp/other.img) && ublkimg restart $d; r=$?; ublkimg detach $d; exit $r'
check umount umount /mnt
check fsck e2fsck -fn "$dev"
check detach ublkimg detach "$dev"
check qemu-check qemu-img check /tmp/s.qcow2
expect_fail restart-unknown "no such device served by ublkimg" ublkimg restart 4
`

// TestVMStatsRestart runs statsLiveScript and checks on the host what the
// guest reported: stats' request counts within 1% of fio's, the metrics
// page in Prometheus' text format (promlint clean) agreeing with stats.
func TestVMStatsRestart(t *testing.T) {
	qemuImg := qemuImgTool(t)
	res := run(t, "truncate -s 64M /tmp/other.img\n"+statsLiveScript, vmtest.RunOptions{Files: []vmtest.File{qemuImg}})
	for _, name := range []string{"restart", "pid-changed", "restart-fio-verified", "fsck", "qemu-check"} {
		if !strings.Contains(res.Log, "RESULT "+name+" PASS") {
			t.Errorf("%s did not pass", name)
		}
	}
	before, after := guestStats(t, res, "stats_before"), guestStats(t, res, "stats_after")
	var fio struct {
		Jobs []struct {
			Read struct {
				TotalIOs uint64 `json:"total_ios"`
			} `json:"read"`
			Write struct {
				TotalIOs uint64 `json:"total_ios"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(res.Metrics["fio_json"]), &fio); err != nil {
		t.Fatalf("fio's JSON: %v", err)
	}
	var fioReads, fioWrites uint64
	for _, j := range fio.Jobs {
		fioReads += j.Read.TotalIOs
		fioWrites += j.Write.TotalIOs
	}
	reads := after.Total["read"].Requests - before.Total["read"].Requests
	writes := after.Total["write"].Requests - before.Total["write"].Requests
	t.Logf("fio: %d reads, %d writes; stats: %d reads, %d writes", fioReads, fioWrites, reads, writes)
	if fioReads == 0 || fioWrites == 0 || !within(reads, fioReads, 0.01) || !within(writes, fioWrites, 0.01) {
		t.Errorf("stats counted %d reads and %d writes, fio %d and %d: more than 1%% apart", reads, writes, fioReads, fioWrites)
	}
	if p := after.Total["write"].Latency; p.P50 == 0 || p.P99 < p.P50 || p.P999 < p.P99 {
		t.Errorf("write latency percentiles %+v", p)
	}

	page, err := base64.StdEncoding.DecodeString(res.Metrics["prom"])
	if err != nil {
		t.Fatalf("metrics page: %v", err)
	}
	mfs := promtest.Check(t, string(page))
	var promWrites float64
	for _, m := range mfs["ublkimg_requests_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "op" && l.GetValue() == "write" {
				promWrites += m.GetCounter().GetValue()
			}
		}
	}
	if uint64(promWrites) < after.Total["write"].Requests {
		t.Errorf("metrics: %v writes, stats said %d before", promWrites, after.Total["write"].Requests)
	}
	for _, name := range []string{"ublkimg_request_duration_seconds", "ublkimg_qcow2_l2_cache_hits_total", "ublkimg_device_up"} {
		if mfs[name] == nil {
			t.Errorf("metrics: no %s", name)
		}
	}
	t.Logf("restart: %s ms; %s", res.Metrics["restart_ms"], res.Metrics["handover"])
	var rst struct {
		Jobs []struct {
			Write struct {
				Clat struct {
					Max float64 `json:"max"`
				} `json:"clat_ns"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if json.Unmarshal([]byte(res.Metrics["restart_fio_json"]), &rst) == nil && len(rst.Jobs) > 0 {
		t.Logf("fio's longest write during the restart: %.1f ms", rst.Jobs[0].Write.Clat.Max/1e6)
	}
}

// statsJSON is what the host reads of `ublkimg stats --output json`.
type statsJSON struct {
	Total map[string]struct {
		Requests uint64 `json:"requests"`
		Latency  struct {
			P50  uint64 `json:"p50"`
			P99  uint64 `json:"p99"`
			P999 uint64 `json:"p99.9"`
		} `json:"latency-ns"`
	} `json:"total"`
}

func guestStats(t *testing.T, res *vmtest.Result, name string) statsJSON {
	t.Helper()
	var s []statsJSON
	if err := json.Unmarshal([]byte(res.Metrics[name]), &s); err != nil || len(s) != 1 {
		t.Fatalf("%s: %v (%q)", name, err, res.Metrics[name])
	}
	return s[0]
}

func within(got, want uint64, frac float64) bool {
	return math.Abs(float64(got)-float64(want)) <= frac*float64(want)
}
