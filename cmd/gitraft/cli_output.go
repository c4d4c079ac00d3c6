package main

// Output helpers shared by the admin commands: tables for people, protojson
// for scripts, and relative times.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// table writes aligned columns. Create it with newTable, add rows with row,
// and call flush once. Rows are buffered and reach w in a few large writes
// at flush: tabwriter writes every cell and every run of padding on its own,
// which for a 10,000-ref repository was 40,000 system calls.
type table struct {
	buf *bufio.Writer
	tw  *tabwriter.Writer
}

func newTable(w io.Writer, header ...string) *table {
	buf := bufio.NewWriterSize(w, 64<<10)
	t := &table{buf: buf, tw: tabwriter.NewWriter(buf, 0, 8, 2, ' ', 0)}
	if len(header) > 0 {
		t.row(header...)
	}
	return t
}

// newKV returns a table for "key: value" lines, values aligned one space
// after the longest key.
func newKV(w io.Writer) *table {
	buf := bufio.NewWriterSize(w, 4<<10)
	return &table{buf: buf, tw: tabwriter.NewWriter(buf, 0, 8, 1, ' ', 0)}
}

// cellBreaks replaces what would break a table's layout inside a cell.
var cellBreaks = strings.NewReplacer("\t", " ", "\n", " ")

// row adds one row; empty cells print as "-" so columns stay readable.
func (t *table) row(cells ...string) {
	for i, c := range cells {
		if c == "" {
			c = "-"
		}
		if strings.ContainsAny(c, "\t\n") {
			c = cellBreaks.Replace(c)
		}
		if i > 0 {
			t.tw.Write(tab)
		}
		io.WriteString(t.tw, c)
	}
	t.tw.Write(newline)
}

var tab, newline = []byte{'\t'}, []byte{'\n'}

func (t *table) flush() error {
	if err := t.tw.Flush(); err != nil {
		return err
	}
	return t.buf.Flush()
}

// jsonMarshal is how every command prints a response with --json: multiline,
// proto field names, with empty fields present so scripts find them.
var jsonMarshal = protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true, EmitUnpopulated: true}

// printProtoJSON writes m as protojson followed by a newline.
func printProtoJSON(w io.Writer, m proto.Message) error {
	b, err := jsonMarshal.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode response as JSON: %w", err)
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// printJSON writes a plain Go value as indented JSON (for the commands that
// have no protobuf response, such as ca).
func printJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode JSON: %w", err)
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// humanDuration formats d compactly: 850ms, 12s, 4m12s, 3h05m, 2d4h.
func humanDuration(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	switch {
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		m, s := int(d/time.Minute), int(d%time.Minute/time.Second)
		if s == 0 {
			return fmt.Sprintf("%dm", m)
		}
		return fmt.Sprintf("%dm%02ds", m, s)
	case d < 24*time.Hour:
		h, m := int(d/time.Hour), int(d%time.Hour/time.Minute)
		if m == 0 {
			return fmt.Sprintf("%dh", h)
		}
		return fmt.Sprintf("%dh%02dm", h, m)
	default:
		days, h := int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour)
		if h == 0 {
			return fmt.Sprintf("%dd", days)
		}
		return fmt.Sprintf("%dd%dh", days, h)
	}
}

// ago formats a past time relative to now: "12ms ago", "3m05s ago"; "-"
// when t is unset. A time slightly in the future (clock skew between nodes)
// reads "just now".
func ago(now time.Time, ts *timestamppb.Timestamp) string {
	if !validTime(ts) {
		return "-"
	}
	d := now.Sub(ts.AsTime())
	if d < 0 {
		return "just now"
	}
	return humanDuration(d) + " ago"
}

// expiresIn formats an expiry relative to now: "in 12s" or "expired".
func expiresIn(now time.Time, ts *timestamppb.Timestamp) string {
	if !validTime(ts) {
		return "-"
	}
	d := ts.AsTime().Sub(now)
	if d <= 0 {
		return "expired"
	}
	return "in " + humanDuration(d)
}

// when formats an absolute time with its relative age:
// "2026-03-01 12:00:00 UTC (3m05s ago)".
func when(now time.Time, ts *timestamppb.Timestamp) string {
	if !validTime(ts) {
		return "-"
	}
	t := ts.AsTime().Local()
	return fmt.Sprintf("%s (%s)", t.Format("2006-01-02 15:04:05 MST"), ago(now, ts))
}

// validTime reports whether ts holds a real time (not unset, not the Unix
// epoch a zero nanosecond count converts to).
func validTime(ts *timestamppb.Timestamp) bool {
	return ts != nil && ts.IsValid() && (ts.GetSeconds() != 0 || ts.GetNanos() != 0)
}
