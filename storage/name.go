package storage

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// Limits on repository names.
const (
	MaxNameLen    = 200
	MaxSegmentLen = 100
	MaxSegments   = 4
)

// ErrInvalidName is wrapped by every name-rule violation.
var ErrInvalidName = errors.New("invalid repository name")

// NameError says which rule a repository name broke.
type NameError struct {
	Name string
	Rule string
}

func (e *NameError) Error() string {
	return fmt.Sprintf("invalid repository name %q: %s", e.Name, e.Rule)
}

func (e *NameError) Unwrap() error { return ErrInvalidName }

// CanonicalName validates a repository name as a client may write it and
// returns the form gitraft stores: a trailing ".git" and a single leading "/"
// are dropped. "acme/site.git" and "/acme/site" both become "acme/site".
func CanonicalName(name string) (string, error) {
	n := strings.TrimPrefix(name, "/")
	n = strings.TrimSuffix(n, ".git")
	if err := ValidateName(n); err != nil {
		if ne, ok := err.(*NameError); ok {
			ne.Name = name
		}
		return "", err
	}
	return n, nil
}

// ValidateName checks a canonical repository name: one to four segments
// separated by "/", each made of letters, digits, '-', '_', '.' and '~', not
// starting with '.' or '-' (so no segment is "." or "..", a hidden file, or a
// command-line option), and not ending in ".git" or ".lock".
func ValidateName(name string) error {
	bad := func(rule string, args ...any) error {
		return &NameError{Name: name, Rule: fmt.Sprintf(rule, args...)}
	}
	switch {
	case name == "":
		return bad("name is empty")
	case len(name) > MaxNameLen:
		return bad("longer than %d bytes", MaxNameLen)
	case !utf8.ValidString(name):
		return bad("not valid UTF-8")
	case strings.HasPrefix(name, "/") || filepath.IsAbs(name):
		return bad("absolute path; use a relative name like \"team/project\"")
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return bad("contains a control character")
		}
	}
	segs := strings.Split(name, "/")
	if len(segs) > MaxSegments {
		return bad("more than %d path segments", MaxSegments)
	}
	for _, s := range segs {
		if s == "" {
			return bad("empty path segment (leading, trailing or double '/')")
		}
		if s == "." || s == ".." {
			return bad("contains a %q path segment", s)
		}
		if len(s) > MaxSegmentLen {
			return bad("segment longer than %d bytes", MaxSegmentLen)
		}
		if s[0] == '.' || s[0] == '-' {
			return bad("segment %q starts with %q", s, s[0])
		}
		for _, r := range s {
			if !nameRune(r) {
				return bad("contains %q; allowed are letters, digits, '-', '_', '.', '~' and '/' between segments", r)
			}
		}
		if strings.HasSuffix(s, ".git") || strings.HasSuffix(s, ".lock") {
			return bad("segment %q ends in .git or .lock", s)
		}
	}
	return nil
}

func nameRune(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
		r == '-' || r == '_' || r == '.' || r == '~'
}

// PathIn returns the directory for a repository under root, after checking
// the name and that the result stays inside root.
func PathIn(root, name string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	p := filepath.Join(root, filepath.FromSlash(name)+".git")
	rel, err := filepath.Rel(root, p)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", &NameError{Name: name, Rule: "resolves outside the data directory"}
	}
	return p, nil
}
