package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// smoke checks a running harness through its kubeconfig (admin client
// certificate): version, namespace, ServiceAccount, TokenRequest and
// TokenReview. It prints one line per step and fails on the first error.
func smoke(argv []string) error {
	fl := flag.NewFlagSet("kube-harness smoke", flag.ContinueOnError)
	kubeconfig := fl.String("kubeconfig", "", "kubeconfig written by kube-harness run (DIR/kubeconfig)")
	namespace := fl.String("namespace", "", "namespace to create (default: smoke-<random>)")
	keep := fl.Bool("keep", false, "do not delete the namespace afterwards")
	controllers := fl.Bool("controllers", true, "also check the kube-controller-manager's work (run without --controller-manager=false)")
	if err := fl.Parse(argv); err != nil {
		return err
	}
	if *kubeconfig == "" {
		*kubeconfig = os.Getenv("KUBECONFIG")
	}
	if *kubeconfig == "" {
		return fmt.Errorf("--kubeconfig is required")
	}
	if *namespace == "" {
		*namespace = "smoke-" + rand.String(6)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		return fmt.Errorf("GET /version: %w", err)
	}
	fmt.Printf("version: %s (%s, %s)\n", v.GitVersion, v.GoVersion, v.Platform)

	ns, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: *namespace}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create namespace: %w", err)
	}
	fmt.Printf("namespace: %s created (uid %s)\n", ns.Name, ns.UID)
	if !*keep {
		defer cs.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	}

	sa, err := cs.CoreV1().ServiceAccounts(ns.Name).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "smoke"}}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create serviceaccount: %w", err)
	}
	fmt.Printf("serviceaccount: %s/%s created\n", sa.Namespace, sa.Name)

	expiry := int64(600)
	tr, err := cs.CoreV1().ServiceAccounts(ns.Name).CreateToken(ctx, sa.Name, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &expiry},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("TokenRequest: %w", err)
	}
	fmt.Printf("tokenrequest: token of %d bytes, audiences %v, expires %s\n",
		len(tr.Status.Token), tr.Spec.Audiences, tr.Status.ExpirationTimestamp.UTC().Format(time.RFC3339))

	review, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: tr.Status.Token},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("TokenReview: %w", err)
	}
	st := review.Status
	fmt.Printf("tokenreview: authenticated=%v username=%s groups=%v audiences=%v error=%q\n",
		st.Authenticated, st.User.Username, st.User.Groups, st.Audiences, st.Error)
	want := "system:serviceaccount:" + ns.Name + ":" + sa.Name
	if !st.Authenticated || st.User.Username != want {
		return fmt.Errorf("TokenReview: want authenticated user %s, got %+v", want, st)
	}

	bad, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: tr.Status.Token + "x"},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("TokenReview (tampered token): %w", err)
	}
	if bad.Status.Authenticated {
		return fmt.Errorf("TokenReview accepted a tampered token")
	}
	fmt.Printf("tokenreview (tampered): authenticated=%v\n", bad.Status.Authenticated)

	// Services get a ClusterIP from --service-cluster-ip-range.
	svc, err := cs.CoreV1().Services(ns.Name).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "web"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create service: %w", err)
	}
	fmt.Printf("service: %s/%s clusterIP=%s\n", svc.Namespace, svc.Name, svc.Spec.ClusterIP)

	if err := checkWebhookAdmission(ctx, cs, ns.Name); err != nil {
		return err
	}

	if *controllers {
		if err := checkControllers(ctx, cs, ns.Name, svc.Name, *keep); err != nil {
			return err
		}
	}
	fmt.Println("smoke: ok")
	return nil
}

// checkWebhookAdmission proves ValidatingAdmissionWebhook is on: a webhook
// that cannot be reached, with failurePolicy Fail and scoped to the smoke
// namespace, must make the API server reject a ConfigMap there.
func checkWebhookAdmission(ctx context.Context, cs kubernetes.Interface, ns string) error {
	fail := admissionv1.Fail
	none := admissionv1.SideEffectClassNone
	timeout := int32(2)
	url := "https://127.0.0.1:1/validate" // loopback, nothing listens on port 1
	name := "kube-harness-smoke-" + ns
	_, err := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, &admissionv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks: []admissionv1.ValidatingWebhook{{
			Name:                    "smoke.kube-harness.test",
			ClientConfig:            admissionv1.WebhookClientConfig{URL: &url},
			Rules:                   []admissionv1.RuleWithOperations{{Operations: []admissionv1.OperationType{admissionv1.Create}, Rule: admissionv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"}}}},
			FailurePolicy:           &fail,
			SideEffects:             &none,
			TimeoutSeconds:          &timeout,
			AdmissionReviewVersions: []string{"v1"},
			NamespaceSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": ns}},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create validatingwebhookconfiguration: %w", err)
	}
	defer cs.AdmissionregistrationV1().ValidatingWebhookConfigurations().Delete(context.Background(), name, metav1.DeleteOptions{})
	// The webhook configuration reaches the admission plugin through an
	// informer: retry until the rejection shows up.
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		_, err = cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("probe-%d", i)}}, metav1.CreateOptions{})
		if err != nil && strings.Contains(err.Error(), "failed calling webhook") {
			fmt.Printf("webhook admission: rejected as expected: %s\n", firstLine(err.Error()))
			return nil
		}
		if err != nil {
			return fmt.Errorf("create configmap under webhook: unexpected error: %w", err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ValidatingAdmissionWebhook: configmap still admitted after 20s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkControllers waits for what kube-controller-manager does in a new
// namespace: the default ServiceAccount, the kube-root-ca.crt ConfigMap, an
// EndpointSlice for the Service, and (unless keep) the namespace deletion.
func checkControllers(ctx context.Context, cs kubernetes.Interface, ns, svc string, keep bool) error {
	poll := func(what string, f func() (bool, error)) error {
		start := time.Now()
		for {
			ok, err := f()
			if ok {
				fmt.Printf("controller-manager: %s (%s)\n", what, time.Since(start).Round(time.Millisecond))
				return nil
			}
			if time.Since(start) > 30*time.Second {
				return fmt.Errorf("controller-manager: %s: not done after 30s (last error: %v)", what, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if err := poll("default ServiceAccount created", func() (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	}); err != nil {
		return err
	}
	if err := poll("kube-root-ca.crt ConfigMap published", func() (bool, error) {
		_, err := cs.CoreV1().ConfigMaps(ns).Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err == nil, err
	}); err != nil {
		return err
	}
	if err := poll("EndpointSlice for service "+svc+" created", func() (bool, error) {
		l, err := cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
		return err == nil && len(l.Items) > 0, err
	}); err != nil {
		return err
	}
	if keep {
		return nil
	}
	if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete namespace: %w", err)
	}
	return poll("namespace "+ns+" deleted", func() (bool, error) {
		_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		return apierrors.IsNotFound(err), err
	})
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
