package qcow2

import (
	"errors"

	"ublkimg/bdrv"
	"ublkimg/coroutine"
)

var createOptionSpecs []bdrv.OptionSpec

func create(co *coroutine.Co, req *bdrv.CreateRequest) error {
	return errors.New("not yet")
}
