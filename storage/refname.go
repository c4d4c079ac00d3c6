package storage

import (
	"errors"
	"fmt"
	"strings"
)

// Git's ref-name rules, shared by the state machine (every node must judge
// a ref change the same way) and the push path (which must judge it as
// git's receive-pack will).

// ErrInvalidRef is wrapped by ref-name rule violations.
var ErrInvalidRef = errors.New("invalid ref name")

// ValidateRefName applies git's check-ref-format rules to a full ref name,
// which must start with "refs/".
func ValidateRefName(ref string) error {
	bad := func(rule string) error { return fmt.Errorf("%w %q: %s", ErrInvalidRef, ref, rule) }
	switch {
	case !strings.HasPrefix(ref, "refs/"):
		return bad(`must start with "refs/"`)
	case len(ref) > 1024:
		return bad("longer than 1024 bytes")
	case strings.Contains(ref, ".."), strings.Contains(ref, "@{"), strings.Contains(ref, "//"):
		return bad(`contains "..", "@{" or "//"`)
	case strings.HasSuffix(ref, "/"), strings.HasSuffix(ref, "."), strings.HasSuffix(ref, ".lock"):
		return bad(`ends in "/", "." or ".lock"`)
	}
	for _, r := range ref {
		if r < 0x20 || r == 0x7f || strings.ContainsRune(" ~^:?*[\\", r) {
			return bad(fmt.Sprintf("contains %q", r))
		}
	}
	for _, seg := range strings.Split(ref, "/") {
		if strings.HasPrefix(seg, ".") || strings.HasSuffix(seg, ".lock") {
			return bad(`a component starts with "." or ends in ".lock"`)
		}
	}
	return nil
}

// ValidateGitRefName applies git's own rules for a ref a push may create
// (receive-pack's "funny refname" check): a valid ref name under "refs/"
// with at least two components after it, so refs/foo is refused and
// refs/heads/foo is not. Bytes of 0x80 and above are allowed, as in git.
func ValidateGitRefName(ref string) error {
	if err := ValidateRefName(ref); err != nil {
		return err
	}
	rest := strings.TrimPrefix(ref, "refs/")
	if !strings.Contains(rest, "/") {
		return fmt.Errorf("%w %q: git takes only refs with at least two components after \"refs/\" (like refs/heads/%s)", ErrInvalidRef, ref, rest)
	}
	return nil
}

// RefConflicts refuses a ref set where a ref is also a directory of
// another (refs/heads/a next to refs/heads/a/b): git cannot store both, so
// no copy could reach such a state. Only the refs created (names in refs)
// are checked; the set was free of conflicts before.
func RefConflicts(refs map[string]string, created []string) error {
	if len(created) == 0 {
		return nil
	}
	dirs := make(map[string]bool, len(refs))
	for name := range refs {
		for i := len(name) - 1; i > len("refs"); i-- {
			if name[i] == '/' {
				d := name[:i]
				if dirs[d] {
					break // and every shorter prefix is there too
				}
				dirs[d] = true
			}
		}
	}
	for _, name := range created {
		if dirs[name] {
			return fmt.Errorf("%w %q: refs under %s/ exist, and git cannot have a ref and a directory of the same name", ErrInvalidRef, name, name)
		}
		for i := len(name) - 1; i > len("refs"); i-- {
			if name[i] == '/' {
				if _, ok := refs[name[:i]]; ok {
					return fmt.Errorf("%w %q: ref %s exists, and git cannot have a ref and a directory of the same name", ErrInvalidRef, name, name[:i])
				}
			}
		}
	}
	return nil
}
