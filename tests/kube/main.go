// kube-harness runs a real Kubernetes control plane on loopback for tests:
// an embedded etcd (go.etcd.io/etcd/server/v3/embed) and the real
// kube-apiserver (k8s.io/kubernetes/cmd/kube-apiserver/app), both inside this
// process, in the manner of controller-runtime's envtest.
//
// Usage:
//
//	kube-harness [run] [--dir DIR] [--port N] [--controller-manager=false] [-- extra kube-apiserver flags]
//	kube-harness smoke --kubeconfig DIR/kubeconfig
//	kube-harness controller-manager [kube-controller-manager flags]   (used by run)
//
// Built with -tags kcm (build.sh --with-controller-manager), "run" also starts
// the real kube-controller-manager (a child process of this binary) with a small
// set of controllers, unless --controller-manager=false.
// It prints one JSON line on stdout once /readyz answers ok (and the
// controller manager has created the "default" ServiceAccount) and then runs
// until SIGTERM or SIGINT. Logs go to stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const (
	serviceCIDR = "10.0.0.0/24"
	issuer      = "https://kubernetes.default.svc.cluster.local"
)

func main() {
	args := os.Args[1:]
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "run":
		err = run(args)
	case "smoke":
		err = smoke(args)
	case "controller-manager":
		os.Exit(runControllerManager(args))
	default:
		err = fmt.Errorf("unknown subcommand %q (want run or smoke)", cmd)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kube-harness:", err)
		os.Exit(1)
	}
}

// readyInfo is the JSON line printed on stdout (and written to DIR/ready.json).
type readyInfo struct {
	Kubeconfig string `json:"kubeconfig"`
	Server     string `json:"server"`
	CA         string `json:"ca"`
	PID        int    `json:"pid"`
	Dir        string `json:"dir"`
	Etcd       string `json:"etcd"`
	Issuer     string `json:"issuer"`
	AdminCert  string `json:"admin_cert"`
	AdminKey   string `json:"admin_key"`
	// ControllerManagerPID is the kube-controller-manager child (0 if not run).
	ControllerManagerPID int `json:"controller_manager_pid"`
}

func run(argv []string) error {
	fl := flag.NewFlagSet("kube-harness run", flag.ContinueOnError)
	dir := fl.String("dir", "", "state dir: certificates, kubeconfig, etcd data (default: a new temp dir, removed on exit)")
	port := fl.Int("port", 0, "secure port of kube-apiserver on 127.0.0.1 (0 = pick a free one)")
	etcdLog := fl.String("etcd-log-level", "error", "embedded etcd log level (debug, info, warn, error)")
	readyTimeout := fl.Duration("ready-timeout", 3*time.Minute, "how long to wait for /readyz")
	withKCM := fl.Bool("controller-manager", controllerManagerBuilt, "also run kube-controller-manager (child process; needs a build with -tags kcm)")
	controllers := fl.String("controllers", defaultControllers, "kube-controller-manager --controllers")
	var kcmExtra []string
	fl.Func("kcm-arg", "extra kube-controller-manager flag (repeatable), e.g. --kcm-arg=--v=2", func(v string) error {
		kcmExtra = append(kcmExtra, v)
		return nil
	})
	fl.Usage = func() {
		fmt.Fprintln(fl.Output(), "usage: kube-harness [run] [flags] [-- extra kube-apiserver flags]")
		fl.PrintDefaults()
	}
	if err := fl.Parse(argv); err != nil {
		return err
	}
	extra := fl.Args() // everything after "--": appended to the kube-apiserver flags

	removeDir := false
	if *dir == "" {
		d, err := os.MkdirTemp("", "kube-harness-")
		if err != nil {
			return err
		}
		*dir, removeDir = d, true
	}
	absDir, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(absDir, 0o700); err != nil {
		return err
	}
	if removeDir {
		defer os.RemoveAll(absDir)
	}
	readyFile := filepath.Join(absDir, "ready.json")
	os.Remove(readyFile) // left by a killed run: not ready yet

	_, svcNet, err := net.ParseCIDR(serviceCIDR)
	if err != nil {
		return err
	}
	svcIP := make(net.IP, len(svcNet.IP.To4()))
	copy(svcIP, svcNet.IP.To4())
	svcIP[3]++ // first address: the "kubernetes" Service

	p, err := newPKI(absDir, svcIP)
	if err != nil {
		return fmt.Errorf("certificates: %w", err)
	}

	// Bind the API server's port first so that it cannot be lost later.
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(*port)))
	if err != nil {
		return fmt.Errorf("listen on 127.0.0.1:%d: %w", *port, err)
	}
	server := "https://" + ln.Addr().String()

	etcd, etcdURL, err := startEtcd(filepath.Join(absDir, "etcd"), *etcdLog)
	if err != nil {
		ln.Close()
		return err
	}
	closeEtcd := sync.OnceFunc(etcd.Close) // embed.Etcd.Close panics when called twice
	defer closeEtcd()

	apiArgs := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// Endpoints may not hold loopback addresses: keep the "kubernetes"
		// Service without endpoints (as k8s.io's own test server does).
		"--endpoint-reconciler-type=none",
		"--cert-dir=" + filepath.Join(absDir, "apiserver-certs"),
		"--tls-cert-file=" + p.ServingCert,
		"--tls-private-key-file=" + p.ServingKey,
		"--client-ca-file=" + p.ClientCACert,
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=" + issuer,
		"--service-account-key-file=" + p.SAPub,
		"--service-account-signing-key-file=" + p.SAKey,
		"--api-audiences=" + issuer,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--allow-privileged=true",
		// Default plugins (NamespaceLifecycle, ServiceAccount, ...,
		// MutatingAdmissionWebhook, ValidatingAdmissionWebhook, ...) plus these.
		"--enable-admission-plugins=NodeRestriction",
	}
	apiArgs = append(apiArgs, extra...)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	apiCtx, cancelAPI := context.WithCancel(context.Background())
	defer cancelAPI()

	apiDone, err := startAPIServer(apiCtx, ln, apiArgs)
	if err != nil {
		ln.Close()
		return fmt.Errorf("kube-apiserver: %w", err)
	}

	kubeconfig := filepath.Join(absDir, "kubeconfig")
	if err := writeKubeconfig(kubeconfig, server, p); err != nil {
		return err
	}

	var kcm *childProc
	shutdown := func() error {
		kcm.stop(15 * time.Second)
		cancelAPI()
		select {
		case err := <-apiDone:
			if err != nil {
				fmt.Fprintln(os.Stderr, "kube-harness: kube-apiserver stopped with:", err)
			}
		case <-time.After(60 * time.Second):
			fmt.Fprintln(os.Stderr, "kube-harness: kube-apiserver did not stop within 60s")
		}
		closeEtcd()
		return nil
	}

	if err := waitReady(ctx, kubeconfig, apiDone, *readyTimeout); err != nil {
		shutdown()
		return err
	}
	kcmDone := make(<-chan error)
	if *withKCM && !controllerManagerBuilt {
		shutdown()
		return fmt.Errorf("--controller-manager: this binary was built without it (build.sh --with-controller-manager)")
	}
	if *withKCM {
		kcm, err = startControllerManager(absDir, kubeconfig, p, *controllers, kcmExtra)
		if err != nil {
			shutdown()
			return err
		}
		kcmDone = kcm.done
		if *controllers == "*" || strings.Contains(","+*controllers+",", ",serviceaccount-controller,") {
			if err := waitDefaultServiceAccount(ctx, kubeconfig, kcmDone, *readyTimeout); err != nil {
				shutdown()
				return err
			}
		}
	}

	info := readyInfo{
		Kubeconfig: kubeconfig, Server: server, CA: p.CACert, PID: os.Getpid(),
		Dir: absDir, Etcd: etcdURL, Issuer: issuer, AdminCert: p.AdminCert, AdminKey: p.AdminKey,
	}
	if kcm != nil {
		info.ControllerManagerPID = kcm.cmd.Process.Pid
	}
	line, _ := json.Marshal(info)
	tmp := filepath.Join(absDir, ".ready.json.tmp")
	if err := os.WriteFile(tmp, append(line, '\n'), 0o644); err == nil {
		os.Rename(tmp, readyFile)
	}
	fmt.Println(string(line))

	select {
	case <-ctx.Done():
		stop() // a second signal kills the process the default way
		fmt.Fprintln(os.Stderr, "kube-harness: signal received, shutting down")
		os.Remove(readyFile)
		return shutdown()
	case err := <-apiDone:
		os.Remove(readyFile)
		kcm.stop(15 * time.Second)
		closeEtcd()
		return fmt.Errorf("kube-apiserver exited: %v", err)
	case err := <-etcd.Err():
		os.Remove(readyFile)
		shutdown()
		return fmt.Errorf("etcd failed: %v", err)
	case err := <-kcmDone:
		os.Remove(readyFile)
		kcm = nil
		shutdown()
		return fmt.Errorf("kube-controller-manager exited: %v", err)
	}
}

func writeKubeconfig(path, server string, p *pki) error {
	ca, err := os.ReadFile(p.CACert)
	if err != nil {
		return err
	}
	crt, err := os.ReadFile(p.AdminCert)
	if err != nil {
		return err
	}
	key, err := os.ReadFile(p.AdminKey)
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kube-harness"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: crt, ClientKeyData: key}
	cfg.Contexts["kube-harness"] = &clientcmdapi.Context{Cluster: "kube-harness", AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = "kube-harness"
	return clientcmd.WriteToFile(*cfg, path)
}

// waitDefaultServiceAccount waits until the serviceaccount controller has
// created default/default: the controller manager is up and syncing.
func waitDefaultServiceAccount(ctx context.Context, kubeconfig string, kcmDone <-chan error, timeout time.Duration) error {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	deadline := time.After(timeout)
	for {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted before kube-controller-manager was ready")
		case err := <-kcmDone:
			return fmt.Errorf("kube-controller-manager exited before it was ready: %v", err)
		case <-deadline:
			return fmt.Errorf("no default ServiceAccount after %s: %v", timeout, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// waitReady polls /readyz as the admin (client certificate) until it answers "ok".
func waitReady(ctx context.Context, kubeconfig string, apiDone <-chan error, timeout time.Duration) error {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	rc.Timeout = 5 * time.Second
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	deadline := time.After(timeout)
	var last error
	for {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && strings.TrimSpace(string(body)) == "ok" {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return errors.New("interrupted before kube-apiserver was ready")
		case err := <-apiDone:
			return fmt.Errorf("kube-apiserver exited before it was ready: %v", err)
		case <-deadline:
			return fmt.Errorf("kube-apiserver not ready after %s: %v", timeout, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
