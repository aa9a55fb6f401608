// Command tcpfwd forwards TCP connections made to ports of 127.0.0.1 to the
// same ports of another address, for guests of the test VM: with QEMU's
// user networking the host's 127.0.0.1 is 10.0.2.2 in the guest, so
//
//	tcpfwd 10.0.2.2 3300 3301 6800-6840
//
// makes services that the host runs on its loopback (a Ceph cluster, whose
// maps name 127.0.0.1 addresses) reachable in the guest at their own
// addresses. It prints "ready" once every port listens and runs until
// killed.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: tcpfwd ADDR PORT|FIRST-LAST...")
		os.Exit(2)
	}
	target := os.Args[1]
	var ports []int
	for _, a := range os.Args[2:] {
		first, last, _ := strings.Cut(a, "-")
		lo, err1 := strconv.Atoi(first)
		hi, err2 := lo, error(nil)
		if last != "" {
			hi, err2 = strconv.Atoi(last)
		}
		if err1 != nil || err2 != nil || lo > hi {
			fmt.Fprintf(os.Stderr, "tcpfwd: bad port %q\n", a)
			os.Exit(2)
		}
		for p := lo; p <= hi; p++ {
			ports = append(ports, p)
		}
	}
	for _, p := range ports {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			fmt.Fprintln(os.Stderr, "tcpfwd:", err)
			os.Exit(1)
		}
		go serve(l, net.JoinHostPort(target, strconv.Itoa(p)))
	}
	fmt.Println("ready")
	select {}
}

// serve forwards each connection l accepts to addr.
func serve(l net.Listener, addr string) {
	for {
		c, err := l.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "tcpfwd:", err)
			return
		}
		go forward(c, addr)
	}
}

// forward copies both ways between c and a new connection to addr until
// either side closes.
func forward(c net.Conn, addr string) {
	defer c.Close()
	u, err := net.Dial("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tcpfwd:", err)
		return
	}
	defer u.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(u, c); u.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(c, u); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}
