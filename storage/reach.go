package storage

import (
	"bufio"
	"context"
	"fmt"
	"strings"
)

// Unreachable returns which of oids no ref of the repository reaches, in
// the order given, each once: objects that are not there, and objects that
// are there but that neither a ref, nor the history, trees and blobs of
// one, holds (say, the commits of a deleted branch). This is what a client
// may not fetch by id. Every oid must be a full, lowercase hex object id.
//
// The usual case costs one git process: every oid is a ref's tip (or the
// object an annotated tag at a tip points to). Commits that are not tips
// take one `git rev-list <commits> --not --all`, which lists exactly those
// no ref reaches. Trees, blobs and tags that are not tips take a walk of
// every reachable object, `git rev-list --objects --all`, stopped as soon as
// all of them have turned up.
func (s *Store) Unreachable(ctx context.Context, name string, oids []string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	var uniq []string
	seen := map[string]bool{}
	for _, o := range oids {
		if seen[o] {
			continue
		}
		if !isOID(o) {
			return nil, fmt.Errorf("storage: %q is not an object id", o)
		}
		seen[o] = true
		uniq = append(uniq, o)
	}
	if len(uniq) == 0 {
		return nil, nil
	}
	// Tips, and the objects of annotated tags at tips.
	out, err := s.run(ctx, path, nil, nil, "for-each-ref", "--format=%(objectname) %(*objectname)")
	if err != nil {
		return nil, err
	}
	reached := map[string]bool{}
	for _, f := range strings.Fields(string(out)) {
		if seen[f] {
			reached[f] = true
		}
	}
	rest := unreached(uniq, reached)
	if len(rest) == 0 {
		return nil, nil
	}
	out, err = s.run(ctx, path, []byte(strings.Join(rest, "\n")+"\n"), nil, "cat-file", "--batch-check=%(objectname) %(objecttype)")
	if err != nil {
		return nil, err
	}
	var commits []string
	others := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		oid, typ, _ := strings.Cut(line, " ")
		if !seen[oid] {
			continue // "<oid> missing": unreachable, as it stays
		}
		if typ == "commit" {
			commits = append(commits, oid)
		} else if typ != "missing" {
			others[oid] = true
		}
	}
	if len(commits) > 0 {
		// Lists every commit the given ones reach and no ref does: a given
		// commit is listed exactly when no ref reaches it. Stops early once
		// all of them are listed.
		unseen := map[string]bool{}
		for _, c := range commits {
			unseen[c] = true
		}
		listed := map[string]bool{}
		in := strings.Join(commits, "\n") + "\n"
		err := s.scan(ctx, path, in, func(line string) bool {
			if unseen[line] {
				listed[line] = true
			}
			return len(listed) < len(unseen)
		}, "rev-list", "--stdin", "--not", "--all")
		if err != nil {
			return nil, err
		}
		for _, c := range commits {
			if !listed[c] {
				reached[c] = true
			}
		}
	}
	if len(others) > 0 {
		found := 0
		err := s.scan(ctx, path, "", func(line string) bool {
			oid, _, _ := strings.Cut(line, " ")
			if others[oid] && !reached[oid] {
				reached[oid] = true
				found++
			}
			return found < len(others)
		}, "rev-list", "--objects", "--all")
		if err != nil {
			return nil, err
		}
	}
	return unreached(uniq, reached), nil
}

func unreached(oids []string, reached map[string]bool) []string {
	var out []string
	for _, o := range oids {
		if !reached[o] {
			out = append(out, o)
		}
	}
	return out
}

// scan runs git in the repository at path and hands each line of its
// output to line until that returns false; git is then stopped.
func (s *Store) scan(ctx context.Context, path, stdin string, line func(string) bool, args ...string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := s.command(ctx, path, nil, args...)
	if stdin != "" {
		c.Stdin = strings.NewReader(stdin)
	}
	var stderr strings.Builder
	c.Stderr = &limitedWriter{w: &stderr, n: 4096}
	pipe, err := c.StdoutPipe()
	if err != nil {
		return err
	}
	if err := StartNice(c); err != nil {
		return gitError(ctx, args, err, "")
	}
	sc := bufio.NewScanner(pipe)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	stopped := false
	for sc.Scan() {
		if !line(sc.Text()) {
			stopped = true
			cancel()
			break
		}
	}
	if stopped {
		c.Wait()
		return nil
	}
	if err := sc.Err(); err != nil {
		cancel()
		c.Wait()
		return fmt.Errorf("storage: reading git %s: %w", args[0], err)
	}
	if err := c.Wait(); err != nil {
		return gitError(ctx, args, err, stderr.String())
	}
	return nil
}

// limitedWriter keeps the first n bytes written to it and drops the rest.
type limitedWriter struct {
	w interface{ WriteString(string) (int, error) }
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n > 0 {
		k := min(len(p), l.n)
		l.w.WriteString(string(p[:k]))
		l.n -= k
	}
	return len(p), nil
}
