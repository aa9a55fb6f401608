package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// getoptArgs rewrites a verb's arguments the way GNU getopt_long reads
// them, into a form urfave/cli (Go's flag package) parses identically:
//
//   - options may follow operands ("ublkimg info a.img --output json"),
//     so they are moved in front and the operands go after a "--";
//   - short options take their value attached or separate ("-c100",
//     "-c 100") and boolean ones combine ("-wq");
//   - long options take "--name=value" or "--name value", and may be
//     abbreviated to any unambiguous prefix ("--back" for
//     "--backing-chain").
//
// Without this, scripts written for qemu-img would break on urfave's
// stop-at-the-first-operand rule. Unknown options are reported as qemu-img
// reports them: "unrecognized option '-Z'".
func getoptArgs(cmd *cli.Command, args []string) ([]string, error) {
	takesValue := map[string]bool{}
	for _, f := range cmd.Flags {
		tv := false
		if df, ok := f.(cli.DocGenerationFlag); ok {
			tv = df.TakesValue()
		}
		for _, n := range f.Names() {
			takesValue[n] = tv
		}
	}
	takesValue["help"], takesValue["h"] = false, false

	var opts, operands []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			operands = append(operands, args[i+1:]...)
			i = len(args)
		case len(a) < 2 || a[0] != '-':
			operands = append(operands, a)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			name, err := longName(takesValue, name, a)
			if err != nil {
				return nil, err
			}
			tv := takesValue[name]
			switch {
			case !tv && hasVal:
				return nil, fmt.Errorf("option '--%s' doesn't allow an argument", name)
			case !tv:
				opts = append(opts, "--"+name)
			case hasVal:
				opts = append(opts, "--"+name, val)
			case i+1 < len(args):
				opts = append(opts, "--"+name, args[i+1])
				i++
			default:
				return nil, fmt.Errorf("missing argument for option '--%s'", name)
			}
		default:
			for j := 1; j < len(a); j++ {
				c := a[j : j+1]
				tv, known := takesValue[c]
				if !known {
					return nil, fmt.Errorf("unrecognized option '%s'", a)
				}
				if !tv {
					opts = append(opts, "-"+c)
					continue
				}
				if j+1 < len(a) {
					opts = append(opts, "-"+c, a[j+1:])
				} else if i+1 < len(args) {
					opts = append(opts, "-"+c, args[i+1])
					i++
				} else {
					return nil, fmt.Errorf("missing argument for option '-%s'", c)
				}
				break
			}
		}
	}
	out := append(opts, "--")
	return append(out, operands...), nil
}

// longName resolves a long option name, possibly abbreviated, as
// getopt_long does: an exact match, else the only option it is a prefix of.
func longName(known map[string]bool, name, arg string) (string, error) {
	if _, ok := known[name]; ok && len(name) > 1 {
		return name, nil
	}
	var match []string
	for n := range known {
		if len(n) > 1 && name != "" && strings.HasPrefix(n, name) {
			match = append(match, n)
		}
	}
	switch len(match) {
	case 1:
		return match[0], nil
	case 0:
		return "", fmt.Errorf("unrecognized option '%s'", arg)
	}
	return "", fmt.Errorf("option '%s' is ambiguous", arg)
}
