package gitproto

import (
	"errors"
	"strings"
	"testing"
)

func Test_ParseCommand(t *testing.T) {
	ok := map[string]Command{
		"git-upload-pack|acme/site.git":     {UploadPack, "acme/site.git"},
		"git|upload-pack|/acme/site":        {UploadPack, "/acme/site"},
		"git-receive-pack|r":                {ReceivePack, "r"},
		"git|receive-pack|r.git":            {ReceivePack, "r.git"},
		"git-upload-archive|x":              {UploadArchive, "x"},
		"git-upload-pack|with space/ok.git": {UploadPack, "with space/ok.git"},
	}
	for in, want := range ok {
		got, err := ParseCommand(strings.Split(in, "|"))
		if err != nil || got != want {
			t.Errorf("ParseCommand(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	bad := map[string]string{
		"":                         "shells are not offered",
		"ls|/":                     "only git-upload-pack",
		"git-shell|x":              "only git-upload-pack",
		"git|daemon|x":             "only git-upload-pack",
		"git-upload-pack":          "only git-upload-pack",
		"git-upload-pack|":         "no repository",
		"git-upload-pack|a|b":      "only git-upload-pack",
		"git-receive-pack|--help|": "only git-upload-pack",
	}
	for in, want := range bad {
		var args []string
		if in != "" {
			args = strings.Split(in, "|")
		}
		_, err := ParseCommand(args)
		if !errors.Is(err, ErrBadCommand) || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseCommand(%q) = %v; want ErrBadCommand mentioning %q", in, err, want)
		}
	}
}

func Test_ParseRefUpdates(t *testing.T) {
	z := strings.Repeat("0", 40)
	a, b := strings.Repeat("a", 40), strings.Repeat("b", 40)
	in := z + " " + a + " refs/heads/new\n" + a + " " + b + " refs/heads/main\n" + b + " " + z + " refs/tags/gone\n"
	got, err := ParseRefUpdates(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []RefUpdate{{"refs/heads/new", "", a}, {"refs/heads/main", a, b}, {"refs/tags/gone", b, ""}}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("update %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	if _, err := ParseRefUpdates(strings.NewReader("not three fields\n")); err == nil {
		t.Error("malformed line accepted")
	}
}
