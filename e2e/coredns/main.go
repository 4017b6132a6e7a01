// CoreDNS with only the plugins the real node of tally-e2e needs: the cluster's DNS (kubernetes), bound to the
// node's address (bind), with health and readiness endpoints (health, ready), a cache and error logging. Built by
// build.sh; upstream's own main links every plugin, most of which reach out to clouds.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
