package bdrv

// BitmapAction is one operation on a persistent bitmap (PersistentBitmaps),
// named as qemu-img bitmap's options and its messages ("Operation add on
// bitmap b failed"). The verb of img and the live job of jobs share it, and
// the control protocol carries it as this string.
type BitmapAction string

// The operations of qemu-img bitmap.
const (
	BitmapAdd     BitmapAction = "add"
	BitmapRemove  BitmapAction = "remove"
	BitmapClear   BitmapAction = "clear"
	BitmapEnable  BitmapAction = "enable"
	BitmapDisable BitmapAction = "disable"
	BitmapMerge   BitmapAction = "merge"
)
