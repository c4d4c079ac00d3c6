package cluster

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

func httpStatus(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The HTTP port has no authentication: the profiler is there only when the
// operator asked for it.
func Test_Node_PProfOnlyWhenSet(t *testing.T) {
	off := mustNewCluster(t, 1).waitLeader()
	if code, _ := httpStatus(t, "http://"+off.HTTPAddr()+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without http.pprof: %d, want 404", code)
	}
	on := mustNewCluster(t, 1, func(cfg *Config) { cfg.PProf = true }).waitLeader()
	code, body := httpStatus(t, "http://"+on.HTTPAddr()+"/debug/pprof/")
	if code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with http.pprof: %d %.200q", code, body)
	}
	if code, _ := httpStatus(t, "http://"+on.HTTPAddr()+"/debug/pprof/goroutine?debug=1"); code != http.StatusOK {
		t.Errorf("goroutine profile: %d", code)
	}
	if code, _ := httpStatus(t, "http://"+on.HTTPAddr()+"/metrics"); code != http.StatusOK {
		t.Errorf("/metrics next to pprof: %d", code)
	}
}
