package cluster

import (
	"bytes"
	"errors"
)

func errorsIs(err, target error) bool { return errors.Is(err, target) }

func bytesReader(b []byte) *bytes.Reader { return bytes.NewReader(b) }
