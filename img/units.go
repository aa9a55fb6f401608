package img

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"ublkimg/bdrv"
)

// SizeToStr formats a byte count as QEMU's size_to_str does ("1 GiB",
// "1.5 MiB", "512 B", "0.977 KiB"): three significant digits of the value
// in the largest binary unit that keeps it below 1000.
func SizeToStr(val uint64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	// frexp's exponent minus one is floor(log2(val * 1024 / 1000)); the
	// 1000/1024 correction switches to the next unit once the integer part
	// reaches 1000 (QEMU commit e41b509d68af).
	_, e := math.Frexp(float64(val) / (1000.0 / 1024.0))
	i := (e - 1) / 10
	div := uint64(1) << (uint(i) * 10)
	return fmt.Sprintf("%.3g %sB", float64(val)/float64(div), suffixes[i])
}

// suffixHelp is the second half of qemu-img's message for a malformed size.
const suffixHelp = "You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."

// ParseSizeArg parses a size argument (qemu-img's cvtnum_full): a number
// with an optional k, M, G, T, P or E suffix, between min and max. name says
// what the number is ("image size", "offset") in the error messages, which
// are qemu-img's: "Invalid image size specified. You may use k, M, G, ..."
// for malformed input and "Invalid offset specified. Must be between 0 and
// 9223372036854775807." for values out of range. (qemu-img prints the
// first message on two lines; ublkimg keeps every error on one.)
func ParseSizeArg(name, value string, min, max int64) (int64, error) {
	v, err := bdrv.ParseSize(value)
	if errors.Is(err, bdrv.ErrSizeTooLarge) {
		// Well formed but beyond 63 bits: QEMU's -ERANGE case.
		return 0, fmt.Errorf("Invalid %s specified. Must be between %d and %d.", name, min, max)
	}
	if err != nil {
		return 0, fmt.Errorf("Invalid %s specified. %s", name, suffixHelp)
	}
	if v < min || v > max {
		return 0, fmt.Errorf("Invalid %s specified. Must be between %d and %d.", name, min, max)
	}
	return v, nil
}

// ParseUintArg parses an integer the way qemu_strtoul with base 0 does
// (decimal, 0x hex or 0 octal) and checks it against max. It returns
// errBadNumber for anything else; callers word the message.
func ParseUintArg(value string, max uint64) (uint64, error) {
	s := strings.TrimLeft(value, " \t\n")
	if s == "" || strings.ContainsRune(s, '_') || strings.HasPrefix(s, "-") {
		return 0, errBadNumber
	}
	s = strings.TrimPrefix(s, "+")
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil || v > max {
		return 0, errBadNumber
	}
	return v, nil
}

var errBadNumber = errors.New("invalid number")
