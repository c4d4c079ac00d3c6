package storage

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func Test_ValidateName_Accepts(t *testing.T) {
	for _, n := range []string{"a", "site", "acme/site", "~alice/dotfiles", "a.b_c-d", "x/y/z/w", strings.Repeat("a", MaxSegmentLen)} {
		if err := ValidateName(n); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", n, err)
		}
	}
}

func Test_ValidateName_Refuses(t *testing.T) {
	cases := map[string]string{
		"":                                   "empty",
		strings.Repeat("a/", 100) + "b":      "longer than",
		"/etc/passwd":                        "absolute",
		"../x":                               `".." path segment`,
		"a/../b":                             `".." path segment`,
		"a/./b":                              `"." path segment`,
		"a//b":                               "empty path segment",
		"a/":                                 "empty path segment",
		"a\x00b":                             "control character",
		"a\nb":                               "control character",
		"a\x7fb":                             "control character",
		"-upload-pack=evil":                  "starts with",
		".hidden":                            "starts with",
		"a b":                                "contains ' '",
		`a\b`:                                `contains '\\'`,
		"a:b":                                "contains ':'",
		"a/b/c/d/e":                          "more than 4",
		"x.git":                              "ends in .git",
		"x.lock/y":                           "ends in .git or .lock",
		"\xff":                               "UTF-8",
		strings.Repeat("a", MaxSegmentLen+1): "segment longer",
		"a$(rm)":                             "contains '$'",
	}
	for n, want := range cases {
		err := ValidateName(n)
		if err == nil {
			t.Errorf("ValidateName(%q) = nil, want error containing %q", n, want)
			continue
		}
		if !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidateName(%q) error %v does not wrap ErrInvalidName", n, err)
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("ValidateName(%q) = %q, want it to contain %q", n, err, want)
		}
	}
}

func Test_CanonicalName(t *testing.T) {
	for in, want := range map[string]string{"acme/site.git": "acme/site", "/acme/site": "acme/site", "/x.git": "x", "x": "x"} {
		got, err := CanonicalName(in)
		if err != nil || got != want {
			t.Errorf("CanonicalName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"//x", "/../x.git", ".git", "/"} {
		if got, err := CanonicalName(in); err == nil {
			t.Errorf("CanonicalName(%q) = %q, want error", in, got)
		}
	}
}

func Test_PathIn(t *testing.T) {
	root := t.TempDir()
	p, err := PathIn(root, "acme/site")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(root, "acme", "site.git"); p != want {
		t.Fatalf("PathIn = %q, want %q", p, want)
	}
	if _, err := PathIn(root, "../escape"); err == nil {
		t.Fatal("PathIn accepted ../escape")
	}
}

func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"a", "a/b", "../x", "a//b", "~u/r"} {
		f.Add(s)
	}
	root := "/data/repos"
	f.Fuzz(func(t *testing.T, name string) {
		if ValidateName(name) != nil {
			return
		}
		p, err := PathIn(root, name)
		if err != nil {
			t.Fatalf("valid name %q but PathIn: %v", name, err)
		}
		if !strings.HasPrefix(p, root+"/") || strings.Contains(name, "..") && strings.Contains("/"+name+"/", "/../") {
			t.Fatalf("valid name %q escapes: %q", name, p)
		}
	})
}
