package dbtarget

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// Probe checks that a PostgreSQL server accepts connections at ep: it
// connects and sends an SSLRequest, which the server answers with one byte
// ('S' or 'N') before any authentication. It needs no credentials, and the
// server logs nothing for a connection that then closes. A server that is
// gone (killed, host down, port closed) fails it.
func Probe(ctx context.Context, ep Endpoint, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ep.Host, strconv.Itoa(ep.Port)))
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	var req [8]byte
	binary.BigEndian.PutUint32(req[0:4], 8)
	binary.BigEndian.PutUint32(req[4:8], 80877103) // SSLRequest code
	if _, err := conn.Write(req[:]); err != nil {
		return fmt.Errorf("send SSLRequest: %w", err)
	}
	var b [1]byte
	if _, err := conn.Read(b[:]); err != nil {
		return fmt.Errorf("no answer to SSLRequest: %w", err)
	}
	if b[0] != 'S' && b[0] != 'N' {
		return fmt.Errorf("answer %q to SSLRequest is not PostgreSQL's", b[0])
	}
	return nil
}

// ProberConfig configures a node's prober of the primary.
type ProberConfig struct {
	Interval time.Duration
	Timeout  time.Duration
	// Probe replaces the real Probe (tests).
	Probe func(ctx context.Context, ep Endpoint, timeout time.Duration) error
}

// Prober probes the state's primary from this node and reports how long it
// has been unreachable; the leader fails over on a majority of such reports.
type Prober struct {
	cfg ProberConfig
	c   Cluster
	log *slog.Logger
}

// NewProber returns a prober; Run starts it.
func NewProber(cfg ProberConfig, c Cluster, log *slog.Logger) *Prober {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultReportInterval
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultProbeTimeout
	}
	if cfg.Probe == nil {
		cfg.Probe = Probe
	}
	if log == nil {
		log = slog.Default()
	}
	return &Prober{cfg: cfg, c: c, log: log}
}

// Run probes every interval until ctx ends.
func (p *Prober) Run(ctx context.Context) {
	var primary string
	var gen uint64
	var downSince time.Time
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		st, err := p.c.DatabaseState(ctx, false)
		if err == nil && st.GetPrimary() != "" {
			if st.GetPrimary() != primary || st.GetGeneration() != gen {
				primary, gen, downSince = st.GetPrimary(), st.GetGeneration(), time.Time{}
			}
			ep, _ := PrimaryEndpoint(st)
			r := &dbv1.ProbeReport{Primary: primary, Generation: gen, Reachable: true}
			if perr := p.cfg.Probe(ctx, ep, p.cfg.Timeout); perr != nil {
				now := time.Now()
				if downSince.IsZero() {
					downSince = now
					p.log.Warn("the primary does not answer", "primary", primary, "endpoint", ep.String(), "generation", gen, "err", perr)
				}
				r.Reachable, r.Error, r.UnreachableNanos = false, perr.Error(), int64(now.Sub(downSince))
			} else {
				if !downSince.IsZero() {
					p.log.Info("the primary answers again", "primary", primary, "down_for", time.Since(downSince).String())
				}
				downSince = time.Time{}
			}
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if err := p.c.ReportDatabase(rctx, &dbv1.ReportRequest{Node: p.c.ID(), Probe: r}); err != nil {
				p.log.Debug("report to the leader failed", "err", err)
			}
			cancel()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
