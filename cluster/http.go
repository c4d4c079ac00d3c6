package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func (n *Node) serveHTTP() error {
	ln, err := net.Listen("tcp", n.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("http listen: %w", err)
	}
	n.httpLn = ln
	n.httpServer = &http.Server{Handler: n.HTTPHandler(), ReadHeaderTimeout: 5 * time.Second}
	if n.cfg.PProf {
		n.log.Warn("serving /debug/pprof/ on the HTTP port, which has no authentication: anyone who reaches it can profile this node and read its command line; keep the port private or turn http.pprof off", "http_addr", ln.Addr().String())
	}
	n.goRun(func() {
		if err := n.httpServer.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("http server stopped", "err", err)
		}
	})
	return nil
}

// HTTPHandler serves /metrics, /healthz and /readyz, and /debug/pprof/
// when Config.PProf is set.
func (n *Node) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	if n.cfg.PProf {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeHealth(w, true, map[string]any{"node": n.cfg.NodeID, "state": n.raft.State().String()})
	})
	n.databaseHTTP(mux)
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, why := n.Ready()
		writeHealth(w, ok, map[string]any{"node": n.cfg.NodeID, "state": n.raft.State().String(), "applied_index": n.fsm.Index(), "reason": why})
	})
	return mux
}

// Ready reports whether the node is ready to serve: its state machine has
// not halted, a leader is known and the node has applied what the leader
// had committed when it started.
func (n *Node) Ready() (bool, string) {
	if h := n.fsm.Halted(); h != nil {
		return false, h.Message()
	}
	if n.joinErr.Load() != nil && !n.inConfiguration() {
		return false, "not a member: " + *n.joinErr.Load()
	}
	if _, lid := n.raft.LeaderWithID(); lid == "" {
		return false, "no leader known"
	}
	if !n.ready.Load() {
		return false, "catching up with the leader's log"
	}
	if filling, why := n.filling(); filling {
		return false, why
	}
	if n.git != nil {
		if _, stuck, names := n.git.Health(); stuck > 0 {
			return false, fmt.Sprintf("%d repositories have failed to catch up for over %s (%s); see gitraft repo show NAME", stuck, n.git.StuckAfter(), strings.Join(names, ", "))
		}
	}
	return true, ""
}

func writeHealth(w http.ResponseWriter, ok bool, body map[string]any) {
	w.Header().Set("Content-Type", "application/json")
	body["ok"] = ok
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	if body["reason"] == "" {
		delete(body, "reason")
	}
	json.NewEncoder(w).Encode(body)
}

// filling reports whether this node, started without Raft state, still
// refills its disk: it is ready only once it has held every repository its
// state had when it first caught up with the log (later pushes are what
// any node catches up on). Once filled it stays so.
func (n *Node) filling() (bool, string) {
	if !n.fresh || n.git == nil || n.filled.Load() || !n.ready.Load() {
		return false, ""
	}
	n.fillMu.Lock()
	defer n.fillMu.Unlock()
	if n.fillMarks == nil {
		n.fillMarks = replicaNode{n}.Repos()
	}
	held, total := n.git.Held(n.fillMarks), len(n.fillMarks)
	if held >= total {
		n.filled.Store(true)
		n.fillMarks = nil
		if total > 0 {
			n.log.Info("filled: this node holds every repository it started without", "repos", total)
		}
		return false, ""
	}
	return true, fmt.Sprintf("filling %d/%d repos: this node started with an empty data dir and is ready once it holds every repository", held, total)
}
