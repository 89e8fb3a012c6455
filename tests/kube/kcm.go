package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

)

// defaultControllers is the controller set kube-harness runs unless told
// otherwise: what a cluster without nodes needs for ServiceAccounts,
// namespaces, owner references, EndpointSlices and aggregated ClusterRoles.
var defaultControllers = strings.Join([]string{
	"serviceaccount-controller",                // "default" ServiceAccount in every namespace
	"serviceaccount-token-controller",          // legacy SA token Secrets (when asked for)
	"root-ca-certificate-publisher-controller", // kube-root-ca.crt ConfigMap in every namespace
	"namespace-controller",                     // namespace deletion finishes
	"garbage-collector-controller",             // ownerReferences cascade
	"endpointslice-controller",                 // Service selector -> EndpointSlices from Pods
	"endpointslice-mirroring-controller",       // selector-less Endpoints -> EndpointSlices
	"endpoints-controller",                     // Service selector -> Endpoints from Pods
	"clusterrole-aggregation-controller",       // admin/edit/view ClusterRoles get their rules
	"replicaset-controller",
	"deployment-controller",
}, ",")

type childProc struct {
	cmd  *exec.Cmd
	done chan error
}

// startControllerManager re-executes this binary as kube-controller-manager
// against the harness's API server. Its output goes to our stderr.
func startControllerManager(dir, kubeconfig string, p *pki, controllers string, extra []string) (*childProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	args := []string{
		"controller-manager",
		"--kubeconfig=" + kubeconfig,
		"--secure-port=0", // no serving endpoint: nothing to authenticate
		"--leader-elect=false",
		"--controllers=" + controllers,
		"--service-account-private-key-file=" + p.SAKey,
		"--root-ca-file=" + p.CACert,
		"--cluster-name=kube-harness",
	}
	args = append(args, extra...)
	c := exec.Command(exe, args...)
	c.Dir = dir
	c.Stdout = os.Stderr
	c.Stderr = os.Stderr
	// Die with the harness even if it is SIGKILLed. Pdeathsig follows the
	// thread that forked, so fork from a goroutine locked to its thread for
	// the child's whole life.
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	cp := &childProc{cmd: c, done: make(chan error, 1)}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := c.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		cp.done <- c.Wait()
		// Never UnlockOSThread: the thread exits with the goroutine, after the child.
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start kube-controller-manager: %w", err)
	}
	return cp, nil
}

// stop sends SIGTERM and waits; SIGKILL after the grace period.
func (cp *childProc) stop(grace time.Duration) {
	if cp == nil || cp.cmd.Process == nil {
		return
	}
	_ = cp.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-cp.done:
	case <-time.After(grace):
		_ = cp.cmd.Process.Kill()
		<-cp.done
	}
}
