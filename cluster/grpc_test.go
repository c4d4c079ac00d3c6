package cluster

import (
	"testing"

	"google.golang.org/grpc"

	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// Every method of the node-to-node services, the push pipeline's
// included, needs a node certificate; the admin API does not.
func Test_NodeOnlyMethods(t *testing.T) {
	for _, svc := range []struct {
		name    string
		methods []string
	}{
		{nodev1.NodeService_ServiceDesc.ServiceName, methodNames(nodev1.NodeService_ServiceDesc.Methods, nodev1.NodeService_ServiceDesc.Streams)},
		{replicav1.ReplicaService_ServiceDesc.ServiceName, methodNames(replicav1.ReplicaService_ServiceDesc.Methods, replicav1.ReplicaService_ServiceDesc.Streams)},
	} {
		if len(svc.methods) == 0 {
			t.Fatalf("%s has no methods", svc.name)
		}
		for _, m := range svc.methods {
			if full := "/" + svc.name + "/" + m; !nodeOnlyMethod(full) {
				t.Errorf("%s is open to admin certificates", full)
			}
		}
	}
	if full := "/" + repov1.RepoService_ServiceDesc.ServiceName + "/GetRepo"; nodeOnlyMethod(full) {
		t.Errorf("%s refuses admin certificates", full)
	}
}

func methodNames(unary []grpc.MethodDesc, streams []grpc.StreamDesc) []string {
	var out []string
	for _, m := range unary {
		out = append(out, m.MethodName)
	}
	for _, s := range streams {
		out = append(out, s.StreamName)
	}
	return out
}
