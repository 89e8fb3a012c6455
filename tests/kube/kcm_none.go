//go:build !kcm

package main

import (
	"fmt"
	"os"
)

// controllerManagerBuilt: built without kube-controller-manager, which is
// about a quarter of a cold build; `build.sh --with-controller-manager`
// (-tags kcm) adds it.
const controllerManagerBuilt = false

func runControllerManager([]string) int {
	fmt.Fprintln(os.Stderr, "kube-harness: built without kube-controller-manager (build.sh --with-controller-manager)")
	return 2
}
