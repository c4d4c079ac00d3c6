package cluster

import (
	"bufio"
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	"google.golang.org/protobuf/types/known/durationpb"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

const (
	alertRulesFile = "../dist/prometheus/gitraft-alerts.yml"
	dashboardFile  = "../dist/grafana/gitraft.json"
)

// waitingMetrics are metrics the alert rules use that no gitraft exports
// yet: each belongs to a feature still to be built, and its rule says so
// in a comment (none today). Once a node exports one, this test asks for it to
// be taken off the list.
var waitingMetrics = map[string]string{}

// fromPrometheus are series Prometheus makes itself for every target.
var fromPrometheus = map[string]bool{"up": true}

var descName = regexp.MustCompile(`fqName: "([^"]+)"`)

// exportedMetrics is every metric name a node exports: what its /metrics
// shows, and every metric its registry describes (a vector with no series
// yet, a mail gauge with no host, a leader-only gauge), with the series
// names a histogram adds.
func exportedMetrics(t *testing.T, n *Node) map[string]bool {
	t.Helper()
	names := map[string]bool{}
	_, body := httpGet(t, "http://"+n.HTTPAddr()+"/metrics")
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	ch := make(chan *prometheus.Desc)
	go func() { n.metrics.reg.Describe(ch); close(ch) }()
	for d := range ch {
		if m := descName.FindStringSubmatch(d.String()); m != nil {
			for _, suffix := range []string{"", "_bucket", "_sum", "_count"} {
				names[m[1]+suffix] = true
			}
		}
	}
	return names
}

// metricsIn lists the metric names a PromQL expression selects.
func metricsIn(t *testing.T, expr string) []string {
	t.Helper()
	e, err := parser.NewParser(parser.Options{}).ParseExpr(expr)
	if err != nil {
		t.Fatalf("%q does not parse: %v", expr, err)
	}
	var out []string
	parser.Inspect(e, func(node parser.Node, _ []parser.Node) error {
		if vs, ok := node.(*parser.VectorSelector); ok {
			out = append(out, vs.Name)
		}
		return nil
	})
	return out
}

var (
	exportedOnce  sync.Once
	exportedNames map[string]bool
)

// nodeMetrics is exportedMetrics of a node with something of everything,
// made once per test binary.
func nodeMetrics(t *testing.T) map[string]bool {
	t.Helper()
	exportedOnce.Do(func() { exportedNames = exportedMetrics(t, metricsNode(t)) })
	if exportedNames == nil {
		t.Fatal("no metrics from an earlier attempt")
	}
	return exportedNames
}

// A node with something of everything, so that its vectors have series.
func metricsNode(t *testing.T) *Node {
	t.Helper()
	n := mustNewCluster(t, 1).waitLeader()
	propose(t, n, create("acme/site"))
	propose(t, n, acquire("acme/site", "n1/push", time.Minute))
	propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{
		Member: &dbv1.Member{Name: "pg1", Host: "127.0.0.1", Port: 5432, Node: "n1"}}}}}})
	propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{Name: "pg1"}}}}})
	for _, h := range []string{"mx1", "mx2"} {
		propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{Name: h, Address: h + ".example.org", Priority: 10}}}}})
	}
	return n
}

// The alert rules load as Prometheus loads them (the check promtool check
// rules makes), and every metric they use is one a node exports, or one
// listed as waiting for its feature.
func Test_Dist_AlertRules(t *testing.T) {
	groups, errs := rulefmt.ParseFile(alertRulesFile, false, model.UTF8Validation, parser.NewParser(parser.Options{}), testLogger(t))
	for _, err := range errs {
		t.Error(err)
	}
	if len(errs) > 0 {
		t.FailNow()
	}
	exported := nodeMetrics(t)
	used := map[string]bool{}
	var alerts []string
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts = append(alerts, r.Alert)
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: needs a severity label and summary and description annotations", r.Alert)
			}
			for _, name := range metricsIn(t, r.Expr) {
				used[name] = true
				if !exported[name] && waitingMetrics[name] == "" && !fromPrometheus[name] {
					t.Errorf("%s uses %s, which no gitraft node exports", r.Alert, name)
				}
			}
		}
	}
	for name, feature := range waitingMetrics {
		switch {
		case exported[name]:
			t.Errorf("%s is exported now (%s): take it off waitingMetrics and the WAITING comment off its rule", name, feature)
		case !used[name]:
			t.Errorf("waitingMetrics lists %s, which no rule uses", name)
		}
	}
	// What the issue asks to be alerted on.
	for _, want := range []string{"GitraftNoLeader", "GitraftNodeBehindLog", "GitraftReposBehind", "GitraftReposStuck", "GitraftWriteLockHeldLong",
		"GitraftFSMHalted", "GitraftBackupTooOld", "GitraftHousekeepingOverdue", "GitraftDatabaseNoPromotableStandby", "GitraftMailDrainOverdue"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("no alert %s", want)
		}
	}
}

// The Grafana dashboard is JSON that loads: panels with PromQL targets
// that parse and use only metrics a node exports.
func Test_Dist_GrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			ID      int    `json:"id"`
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				RefID string `json:"refId"`
				Expr  string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.Title == "" || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("%s: no title, uid or panels", dashboardFile)
	}
	exported := nodeMetrics(t)
	ids := map[int]bool{}
	graphs := 0
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d twice", p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		graphs++
		if p.Title == "" || len(p.Targets) == 0 {
			t.Errorf("panel %d (%q) has no title or no targets", p.ID, p.Title)
		}
		for _, tg := range p.Targets {
			// Grafana's variables are not PromQL: give them values.
			expr := strings.NewReplacer("$__rate_interval", "5m", "$job", "gitraft").Replace(tg.Expr)
			for _, name := range metricsIn(t, expr) {
				if !exported[name] {
					t.Errorf("panel %q uses %s, which no gitraft node exports", p.Title, name)
				}
			}
		}
	}
	if graphs < 10 {
		t.Errorf("only %d panels", graphs)
	}
}

// The gauges the alerts rest on say what they should: the oldest lock's
// age, a drain past its deadline, and whether a standby could be promoted.
func Test_Metrics_AlertGauges(t *testing.T) {
	n := metricsNode(t)
	metric := func(line string) bool {
		_, body := httpGet(t, "http://"+n.HTTPAddr()+"/metrics")
		return strings.Contains(body, "\n"+line)
	}
	waitFor(t, "the lock's age", 5*time.Second, func() bool {
		_, body := httpGet(t, "http://"+n.HTTPAddr()+"/metrics")
		return strings.Contains(body, "\ngitraft_lock_oldest_age_seconds ") && !strings.Contains(body, "\ngitraft_lock_oldest_age_seconds 0\n")
	})

	// No standby reports: none could be promoted.
	if !metric("gitraft_db_promotable_standby 0\n") {
		t.Error("gitraft_db_promotable_standby is not 0 without a standby")
	}
	propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{
		Member: &dbv1.Member{Name: "pg2", Host: "127.0.0.2", Port: 5432, Node: "n1"}}}}}})
	waitFor(t, "a promotable standby", 5*time.Second, func() bool {
		n.db.record(&dbv1.ReportRequest{Node: "n1", Postgres: &dbv1.PostgresReport{Member: "pg2", Running: true, InRecovery: true, Streaming: true}}, time.Now())
		return metric("gitraft_db_promotable_standby 1\n")
	})

	// A drain whose deadline passes with mail queued is overdue.
	r := propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{Command: &mailv1.Command_Drain{Drain: &mailv1.Drain{Name: "mx2", Deadline: durationpb.New(time.Millisecond)}}}}})
	if !metric(`gitraft_mail_drain_overdue{host="mx2"} 0`) {
		t.Error("a drain before its deadline is overdue")
	}
	propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{Command: &mailv1.Command_ReportQueue{ReportQueue: &mailv1.ReportQueue{Name: "mx2", DrainId: r.GetIndex(), QueueSize: 4, By: "node:n1"}}}}})
	time.Sleep(5 * time.Millisecond)
	propose(t, n, &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{Command: &mailv1.Command_MarkOverdue{MarkOverdue: &mailv1.MarkOverdue{Name: "mx2", DrainId: r.GetIndex(), By: "node:n1"}}}}})
	if !metric(`gitraft_mail_drain_overdue{host="mx2"} 1`) || !metric(`gitraft_mail_drain_overdue{host="mx1"} 0`) {
		t.Error("gitraft_mail_drain_overdue does not show the overdue drain of mx2 alone")
	}
}
