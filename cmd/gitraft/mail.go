package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/cluster/mail"
)

// mailSettings configure the mail drain agent of `gitraft serve` (on a
// mail host: mail.host) and the DNS outputs (on any node: mail.mx_zone_file).
type mailSettings struct {
	Host             string        `yaml:"host" help:"this machine's mail host name; switches on the Postfix drain agent"`
	Address          string        `yaml:"address" help:"the mail host's MX target (DNS name); registers the host when it is missing"`
	Priority         int           `yaml:"priority" help:"the mail host's MX priority when it registers (default 10)"`
	PostfixConfigDir string        `yaml:"postfix_config_dir" help:"Postfix's config_directory (default /etc/postfix)"`
	PostfixServices  []string      `yaml:"postfix_services" help:"master.cf services (name/type) that answer 4xx while draining (default: every smtpd service)"`
	HandoffPeers     []string      `yaml:"handoff_peers" help:"mail hosts that take leftover mail at a drain's deadline: NAME (its address, port 25) or NAME=[ip]:port"`
	FlushInterval    time.Duration `yaml:"flush_interval" help:"how often a draining host flushes its queue (default 30s)"`
	QueueInterval    time.Duration `yaml:"queue_interval" help:"how often the agent counts the queue (default 2s)"`
	ReportInterval   time.Duration `yaml:"report_interval" help:"how often the agent reports an unchanged queue and applies its Postfix settings again (default 1m)"`
	Settle           time.Duration `yaml:"settle" help:"how long new mail must have been refused before an empty queue counts as drained (default 2s)"`
	MXZoneFile       string        `yaml:"mx_zone_file" help:"write the MX set here as a zone-file fragment on every change"`
	OnChange         string        `yaml:"on_change" help:"command run after each change of mx_zone_file: a plain program gets the path as its last argument, a shell command as $1"`
}

// startMailAgent starts the Postfix drain agent if this node's configuration
// switches it on (mail.host), and the DNS output (mail.mx_zone_file); they
// stop when ctx ends.
func startMailAgent(ctx context.Context, cfg fileConfig, n *cluster.Node, log *slog.Logger) error {
	m := cfg.Mail
	if m.OnChange != "" && m.MXZoneFile == "" {
		return fmt.Errorf("mail.on_change needs mail.mx_zone_file: the command is given the zone fragment's path")
	}
	if m.MXZoneFile != "" {
		out, err := mail.NewOutput(mail.OutputConfig{ZoneFile: m.MXZoneFile, OnChange: m.OnChange}, n, log.With("node", cfg.NodeID))
		if err != nil {
			return err
		}
		go out.Run(ctx)
	}
	if m.Host == "" {
		for _, s := range []struct {
			name string
			set  bool
		}{{"address", m.Address != ""}, {"postfix_config_dir", m.PostfixConfigDir != ""}, {"handoff_peers", len(m.HandoffPeers) > 0}} {
			if s.set {
				return fmt.Errorf("mail.%s is set but mail.host is not: set mail.host to this machine's mail host name to run the drain agent", s.name)
			}
		}
		return nil
	}
	prio := m.Priority
	if prio == 0 {
		prio = 10
	}
	if prio < 0 || prio > 65535 {
		return fmt.Errorf("mail.priority %d: use 1 to 65535 (0 means the default, 10)", m.Priority)
	}
	pf, err := mail.NewPostfix(mail.PostfixConfig{
		ConfigDir: m.PostfixConfigDir, Services: m.PostfixServices,
		StateFile: filepath.Join(cfg.DataDir, "mail", "postfix-overrides.json"),
	}, log.With("node", cfg.NodeID))
	if err != nil {
		return err
	}
	checkCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	svcs, err := pf.Check(checkCtx)
	cancel()
	if err != nil {
		return fmt.Errorf("mail agent for %s: %w", m.Host, err)
	}
	agent, err := mail.NewAgent(mail.AgentConfig{
		Host: m.Host, Address: m.Address, Priority: uint32(prio), NodeID: cfg.NodeID, HandoffPeers: m.HandoffPeers,
		FlushInterval: m.FlushInterval, QueueInterval: m.QueueInterval, ReportInterval: m.ReportInterval, Settle: m.Settle,
	}, n, pf, log.With("node", cfg.NodeID))
	if err != nil {
		return err
	}
	log.Info("mail drain agent on", "node", cfg.NodeID, "mail_host", m.Host, "postfix_services", svcs)
	go agent.Run(ctx)
	return nil
}
