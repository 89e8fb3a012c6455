//go:build kcm

package main

import (
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register" // as in cmd/kube-controller-manager
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

// controllerManagerBuilt: this binary carries kube-controller-manager (-tags kcm).
const controllerManagerBuilt = true

// runControllerManager is the "controller-manager" subcommand: the real
// kube-controller-manager command from k8s.io/kubernetes, with its own flags.
// kube-harness runs it as a child process of itself, so that its global state
// (flags, feature gates, metrics registry, logging) stays apart from the
// API server's.
func runControllerManager(args []string) int {
	cmd := kcmapp.NewControllerManagerCommand()
	cmd.SetArgs(args)
	return cli.Run(cmd)
}
