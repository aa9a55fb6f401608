package main

import (
	"path/filepath"

	"ublkimg/bdrv"
)

// absImage returns the image name made absolute, as the records and the
// background server need it (the server runs from /), unless it names a
// protocol (rbd:pool/image), which no directory changes.
func absImage(image string) (string, error) {
	if bdrv.HasProtocol(image) {
		return image, nil
	}
	return filepath.Abs(image)
}
