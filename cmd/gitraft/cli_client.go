package main

// The admin client: global flags, the connection to a node, and how gRPC
// errors are shown to the person at the terminal.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/pki"
)

// Environment variables that supply the global flags' defaults.
const (
	envAddr       = "GITRAFT_ADDR"
	envCACert     = "GITRAFT_CACERT"
	envClientCert = "GITRAFT_CLIENT_CERT"
	envClientKey  = "GITRAFT_CLIENT_KEY"
	envInsecure   = "GITRAFT_INSECURE"

	defaultAddr    = "127.0.0.1:7102"
	defaultTimeout = 10 * time.Second
)

// globalOpts are the flags every admin command shares: where the node is,
// the credentials to reach it with, and how to print.
type globalOpts struct {
	Addr, CACert, ClientCert, ClientKey string
	Insecure                            bool
	JSON                                bool
	Timeout                             time.Duration
}

// register adds the global flags to fs (the root command's persistent
// flags), with defaults taken from the environment.
func (g *globalOpts) register(fs *pflag.FlagSet) {
	fs.StringVar(&g.Addr, "addr", envOr(envAddr, defaultAddr), "gRPC address (host:port) of any gitraft node [$"+envAddr+"]")
	fs.StringVar(&g.CACert, "ca-cert", os.Getenv(envCACert), "the cluster's CA certificate (PEM) [$"+envCACert+"]")
	fs.StringVar(&g.ClientCert, "client-cert", os.Getenv(envClientCert), "client certificate (PEM) issued by the cluster's CA: an admin or node certificate [$"+envClientCert+"]")
	fs.StringVar(&g.ClientKey, "client-key", os.Getenv(envClientKey), "the client certificate's private key (PEM) [$"+envClientKey+"]")
	fs.BoolVar(&g.Insecure, "insecure", envBool(envInsecure), "connect without TLS (only to a loopback address, for a node run with insecure mode) [$"+envInsecure+"]")
	fs.BoolVar(&g.JSON, "json", false, "print the response as JSON (protojson, proto field names)")
	fs.DurationVar(&g.Timeout, "timeout", defaultTimeout, "how long a command may take (0: no limit)")
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// envBool reads a boolean variable: 1, t, true (any case) are true; anything
// else, including unset, is false.
func envBool(name string) bool {
	b, err := strconv.ParseBool(strings.TrimSpace(os.Getenv(name)))
	return err == nil && b
}

// isLoopback reports whether addr (host:port or host) is a loopback address.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// credentials returns the transport credentials the flags describe, or an
// error saying what to set.
func (g *globalOpts) credentials() (credentials.TransportCredentials, error) {
	if g.Insecure {
		if !isLoopback(g.Addr) {
			return nil, fmt.Errorf("--insecure (%s) is only allowed with a loopback --addr, and %q is not one; connect with TLS instead: set --ca-cert, --client-cert and --client-key (%s, %s, %s)",
				envInsecure, g.Addr, envCACert, envClientCert, envClientKey)
		}
		return insecure.NewCredentials(), nil
	}
	var missing []string
	for _, f := range []struct{ val, flag, env string }{
		{g.CACert, "--ca-cert", envCACert},
		{g.ClientCert, "--client-cert", envClientCert},
		{g.ClientKey, "--client-key", envClientKey},
	} {
		if f.val == "" {
			missing = append(missing, fmt.Sprintf("%s (or $%s)", f.flag, f.env))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("no TLS credentials to reach %s: set %s; create an admin certificate with `gitraft ca issue admin NAME`, or pass --insecure for a node on a loopback address run without TLS",
			g.Addr, joinWords(missing))
	}
	b, err := pki.Files{CA: g.CACert, Cert: g.ClientCert, Key: g.ClientKey}.Load()
	if err != nil {
		return nil, fmt.Errorf("load TLS credentials (--ca-cert %s, --client-cert %s, --client-key %s): %w", g.CACert, g.ClientCert, g.ClientKey, err)
	}
	return credentials.NewTLS(b.ClientConfig("")), nil
}

// joinWords joins items as "a", "a and b" or "a, b and c".
func joinWords(items []string) string {
	switch len(items) {
	case 0:
		return ""
	case 1:
		return items[0]
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}

// dial returns a client connection to g.Addr. It does not wait for the
// connection: the first RPC fails fast, with an error that says whether the
// node could not be reached or the TLS handshake failed.
func (g *globalOpts) dial(ctx context.Context) (*grpc.ClientConn, error) {
	if g.Addr == "" {
		return nil, fmt.Errorf("no node address: set --addr or $%s to a node's gRPC address (host:port)", envAddr)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	creds, err := g.credentials()
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(g.Addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithUnaryInterceptor(g.explainUnary),
	)
	if err != nil {
		return nil, fmt.Errorf("invalid --addr %q: %v", g.Addr, err)
	}
	conn.Connect()
	return conn, nil
}

// connError is a failure to talk to the node at all (as opposed to the node
// answering with an error).
type connError struct{ msg string }

func (e *connError) Error() string { return e.msg }

// explainUnary rewrites connection-level failures of an RPC into a connError
// a person can act on.
func (g *globalOpts) explainUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if err == nil {
		return nil
	}
	return g.explainConnError(err, cc.GetState())
}

// explainConnError turns a transport error into a connError; other errors
// are returned unchanged. state is the connection's state after the failure.
func (g *globalOpts) explainConnError(err error, state connectivity.State) error {
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	msg := st.Message()
	switch st.Code() {
	case codes.Unavailable:
		// With TLS 1.3 the client finishes its handshake first; a node that
		// refuses the client certificate then just drops the connection, and
		// the client sees a broken pipe or a reset instead of an alert.
		if !g.Insecure && (strings.Contains(msg, "broken pipe") || strings.Contains(msg, "connection reset by peer")) {
			return &connError{fmt.Sprintf("TLS handshake with %s failed: the node dropped the connection (%s); it most likely refused the client certificate (is --client-cert an admin or node certificate issued by the cluster's CA?)", g.Addr, transportDetail(msg))}
		}
		if state == connectivity.Ready || !isTransportMessage(msg) {
			// The node answered (e.g. no leader, or it could not reach the
			// leader): the status message is the node's.
			return err
		}
		detail := transportDetail(msg)
		switch {
		case strings.Contains(detail, "first record does not look like a TLS handshake"):
			return &connError{fmt.Sprintf("TLS handshake with %s failed: %s (the node does not speak TLS: is it running in insecure mode? then use --insecure on loopback)", g.Addr, detail)}
		case isTLSMessage(detail):
			return &connError{fmt.Sprintf("TLS handshake with %s failed: %s (is --ca-cert the cluster's CA, and --client-cert an admin or node certificate it issued?)", g.Addr, detail)}
		case g.Insecure && strings.Contains(msg, "server preface"):
			return &connError{fmt.Sprintf("cannot reach gitraft at %s: %s (with --insecure; does the node require TLS? then set --ca-cert, --client-cert and --client-key instead)", g.Addr, detail)}
		}
		return &connError{fmt.Sprintf("cannot reach gitraft at %s: %s (is the node running, and is --addr its gRPC address?)", g.Addr, detail)}
	case codes.DeadlineExceeded:
		if state != connectivity.Ready {
			return &connError{fmt.Sprintf("cannot reach gitraft at %s: no connection within --timeout %s (connection %s)", g.Addr, g.Timeout, strings.ToLower(state.String()))}
		}
	}
	return err
}

// isTransportMessage reports whether an Unavailable status message comes
// from the client's transport rather than from the node.
func isTransportMessage(msg string) bool {
	for _, s := range []string{"connection error", "server preface", "name resolver", "transport:", "error reading from server", "connection closed", "produced zero addresses", "last connection error", "dial tcp", "connect: "} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

func isTLSMessage(msg string) bool {
	for _, s := range []string{"tls:", "x509:", "authentication handshake failed", "certificate"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// transportDetail strips gRPC's wrapping from a transport error message:
// `connection error: desc = "transport: Error while dialing: dial tcp
// 127.0.0.1:7102: connect: connection refused"` becomes "dial tcp
// 127.0.0.1:7102: connect: connection refused".
func transportDetail(msg string) string {
	if i := strings.Index(msg, "desc = "); i >= 0 {
		msg = msg[i+len("desc = "):]
		if u, err := strconv.Unquote(msg); err == nil {
			msg = u
		}
	}
	msg = strings.Trim(msg, `"`)
	for _, p := range []string{"transport: ", "Error while dialing: ", "error while dialing: ", "authentication handshake failed: "} {
		msg = strings.TrimPrefix(msg, p)
	}
	// A TLS alert from the node: it refused our certificate.
	if i := strings.Index(msg, "remote error: tls: "); i >= 0 {
		msg = "the node refused the client certificate (" + msg[i:] + ")"
	}
	return msg
}

// rpcError turns an RPC's error into one line: "<what failed>:
// <status message>", keeping the node's message, which is written for
// people. Connection failures are reported as such.
func rpcError(what string, err error) error {
	if err == nil {
		return nil
	}
	var ce *connError
	if errors.As(err, &ce) {
		return ce
	}
	st, ok := status.FromError(err)
	if !ok {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s: timed out (raise --timeout?)", what)
		}
		return fmt.Errorf("%s: %v", what, err)
	}
	msg := st.Message()
	switch st.Code() {
	case codes.Unavailable:
		if !explainsUnavailable(msg) {
			msg += " (is a majority of nodes up?)"
		}
	case codes.DeadlineExceeded:
		if !strings.Contains(msg, "timeout") {
			msg += " (no answer in time: is a majority of nodes up? raise --timeout to wait longer)"
		}
	case codes.Unauthenticated:
		msg += " (use a certificate issued by the cluster's CA: --client-cert, --client-key)"
	case codes.PermissionDenied:
		// The node's message says which certificate is needed.
	case codes.Unimplemented:
		msg += " (is the node running the same gitraft version?)"
	}
	return fmt.Errorf("%s: %s", what, msg)
}

// explainsUnavailable reports whether an Unavailable message already says
// what to do or why.
func explainsUnavailable(msg string) bool {
	for _, s := range []string{"majority", "leadership was lost", "check before retrying", "?"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// connect prepares an admin command's RPC: a context bounded by --timeout
// and a connection. Call done when finished.
func (g *globalOpts) connect(cmd *cobra.Command) (ctx context.Context, conn *grpc.ClientConn, done func(), err error) {
	cmd.SilenceUsage = true
	ctx = cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	cancel := context.CancelFunc(func() {})
	if g.Timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, g.Timeout)
	}
	conn, err = g.dial(ctx)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return ctx, conn, func() { conn.Close(); cancel() }, nil
}
