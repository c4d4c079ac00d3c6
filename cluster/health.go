package cluster

import (
	"context"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthgrpc "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
)

// healthRefresh is how often the health service's status follows the
// node's readiness for Watch streams; Check and List look at it afresh.
const healthRefresh = time.Second

// healthService is the standard gRPC health service (grpc.health.v1),
// which says what /readyz says: SERVING exactly when Node.Ready, for the
// whole server ("") and for each service the node serves; NOT_SERVING
// while it is not ready, and once it shuts down.
//
// Like every method on the gRPC port it takes mutual TLS with a
// certificate from the cluster CA, admin or node (authorize): the port has
// no unauthenticated methods. Probes without a client certificate use
// /readyz on the HTTP port.
type healthService struct {
	*health.Server
	n        *Node
	services []string // "" and the services registered with the server
}

// registerHealth adds the health service and server reflection to the
// node's gRPC server, and keeps the health status following readiness
// until the node stops. Call it after every other service is registered.
func (n *Node) registerHealth(s *grpc.Server) {
	h := &healthService{Server: health.NewServer(), n: n, services: []string{""}}
	healthgrpc.RegisterHealthServer(s, h)
	reflection.Register(s)
	for name := range s.GetServiceInfo() {
		if !strings.HasPrefix(name, "grpc.reflection.") {
			h.services = append(h.services, name)
		}
	}
	h.refresh()
	n.goRun(func() {
		t := time.NewTicker(healthRefresh)
		defer t.Stop()
		for {
			select {
			case <-n.stop:
				h.Shutdown() // NOT_SERVING for everything, from now on
				return
			case <-t.C:
				h.refresh()
			}
		}
	})
}

// refresh sets every service's status from the node's readiness now.
func (h *healthService) refresh() {
	status := healthgrpc.HealthCheckResponse_NOT_SERVING
	if ok, _ := h.n.Ready(); ok {
		status = healthgrpc.HealthCheckResponse_SERVING
	}
	for _, name := range h.services {
		h.SetServingStatus(name, status)
	}
}

// Check answers from the node's readiness at the time of the call.
func (h *healthService) Check(ctx context.Context, req *healthgrpc.HealthCheckRequest) (*healthgrpc.HealthCheckResponse, error) {
	h.refresh()
	return h.Server.Check(ctx, req)
}

// List answers from the node's readiness at the time of the call.
func (h *healthService) List(ctx context.Context, req *healthgrpc.HealthListRequest) (*healthgrpc.HealthListResponse, error) {
	h.refresh()
	return h.Server.List(ctx, req)
}
