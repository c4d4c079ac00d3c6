package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	reflectiongrpc "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/pki"
)

func grpcConn(t *testing.T, addr string, opt grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func healthOf(t *testing.T, c healthgrpc.HealthClient, service string) (healthgrpc.HealthCheckResponse_ServingStatus, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.Check(ctx, &healthgrpc.HealthCheckRequest{Service: service})
	return r.GetStatus(), err
}

// The gRPC health service says what /readyz says: SERVING once the node is
// ready, for the server and for each service; NOT_SERVING once it halts
// (to Check and to a Watch opened before), as /readyz turns 503.
func Test_Node_GRPCHealthFollowsReadiness(t *testing.T) {
	n := mustNewCluster(t, 1).waitLeader()
	waitFor(t, "the node ready", 10*time.Second, func() bool { ok, _ := n.Ready(); return ok })
	c := healthgrpc.NewHealthClient(grpcConn(t, n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials())))
	for _, svc := range []string{"", "gitraft.repo.v1.RepoService", "gitraft.cluster.v1.ClusterService", "gitraft.node.v1.NodeService", "grpc.health.v1.Health"} {
		if st, err := healthOf(t, c, svc); err != nil || st != healthgrpc.HealthCheckResponse_SERVING {
			t.Errorf("health of %q = %v, %v; want SERVING", svc, st, err)
		}
	}
	if _, err := healthOf(t, c, "gitraft.nope.v1.NopeService"); status.Code(err) != codes.NotFound {
		t.Errorf("health of an unknown service: %v, want NotFound", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch, err := c.Watch(ctx, &healthgrpc.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthgrpc.HealthCheckResponse_SERVING {
		t.Fatalf("first watch answer %v, %v; want SERVING", r, err)
	}

	// A committed entry this binary does not know halts the node.
	if err := n.raft.Apply(futureEntryBytes(t, "bob"), 5*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the node to halt", 10*time.Second, func() bool { return n.fsm.Halted() != nil })
	if code, _ := httpGet(t, "http://"+n.HTTPAddr()+"/readyz"); code != 503 {
		t.Errorf("/readyz = %d on a halted node", code)
	}
	for _, svc := range []string{"", "gitraft.repo.v1.RepoService"} {
		if st, err := healthOf(t, c, svc); err != nil || st != healthgrpc.HealthCheckResponse_NOT_SERVING {
			t.Errorf("health of %q on a halted node = %v, %v; want NOT_SERVING", svc, st, err)
		}
	}
	if r, err := watch.Recv(); err != nil || r.GetStatus() != healthgrpc.HealthCheckResponse_NOT_SERVING {
		t.Errorf("watch after the halt: %v, %v; want NOT_SERVING", r, err)
	}
}

// A node that knows no leader (nothing bootstrapped, nothing to join) is
// not ready, and its health says so.
func Test_Node_GRPCHealthNotReadyWithoutLeader(t *testing.T) {
	c := &testCluster{t: t, dir: t.TempDir(), nodes: map[string]*Node{}, cfgs: map[string]Config{}}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.Close()
		}
	})
	n := c.add("n1", false)
	h := healthgrpc.NewHealthClient(grpcConn(t, n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials())))
	if st, err := healthOf(t, h, ""); err != nil || st != healthgrpc.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health without a leader = %v, %v; want NOT_SERVING", st, err)
	}
	if code, body := httpGet(t, "http://"+n.HTTPAddr()+"/readyz"); code != 503 {
		t.Errorf("/readyz = %d %s", code, body)
	}
}

// Server reflection lists the node's services, and describes them, so
// that grpcurl needs no .proto files.
func Test_Node_GRPCReflection(t *testing.T) {
	n := mustNewCluster(t, 1).waitLeader()
	c := reflectiongrpc.NewServerReflectionClient(grpcConn(t, n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials())))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := c.ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(req *reflectiongrpc.ServerReflectionRequest) *reflectiongrpc.ServerReflectionResponse {
		t.Helper()
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		r, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := ask(&reflectiongrpc.ServerReflectionRequest{MessageRequest: &reflectiongrpc.ServerReflectionRequest_ListServices{}})
	var names []string
	for _, s := range r.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{"gitraft.cluster.v1.ClusterService", "gitraft.repo.v1.RepoService", "gitraft.lock.v1.LockService", "gitraft.user.v1.UserService",
		"gitraft.node.v1.NodeService", "gitraft.db.v1.DatabaseService", "gitraft.mail.v1.MailService", "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection does not list %s (it lists %v)", want, names)
		}
	}
	r = ask(&reflectiongrpc.ServerReflectionRequest{MessageRequest: &reflectiongrpc.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "gitraft.repo.v1.RepoService"}})
	if len(r.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("no descriptor for gitraft.repo.v1.RepoService: %v", r.GetErrorResponse())
	}
}

// Health and reflection take mutual TLS like every method on the gRPC
// port: an admin certificate gets an answer, a client without one does not.
func Test_Node_GRPCHealthNeedsClientCert(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	if _, err := pki.InitCA(ca, "test", time.Hour); err != nil {
		t.Fatal(err)
	}
	nodeCert, nodeKey, err := pki.Issue(ca, pki.IssueOptions{Role: pki.RoleNode, Name: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	adminCert, adminKey, err := pki.Issue(ca, pki.IssueOptions{Role: pki.RoleAdmin, Name: "monitor"})
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(ca, "ca.crt")
	c := mustNewCluster(t, 1, func(cfg *Config) {
		cfg.Insecure = false
		cfg.TLS = TLSFiles{CAFile: caFile, CertFile: nodeCert, KeyFile: nodeKey}
	})
	n := c.waitLeader()
	waitFor(t, "the node ready", 10*time.Second, func() bool { ok, _ := n.Ready(); return ok })

	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	pair, err := tls.LoadX509KeyPair(adminCert, adminKey)
	if err != nil {
		t.Fatal(err)
	}
	withCert := healthgrpc.NewHealthClient(grpcConn(t, n.GRPCAddr(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13}))))
	if st, err := healthOf(t, withCert, ""); err != nil || st != healthgrpc.HealthCheckResponse_SERVING {
		t.Errorf("health with an admin certificate = %v, %v; want SERVING", st, err)
	}
	without := healthgrpc.NewHealthClient(grpcConn(t, n.GRPCAddr(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}))))
	if st, err := healthOf(t, without, ""); err == nil {
		t.Errorf("health without a client certificate answered %v", st)
	}
}
