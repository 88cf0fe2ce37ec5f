package bench

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fleetgate/fleetgate/pkg/identity"
	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Floors are the physical lower bounds of the gateway's work, measured in
// this process on this machine in the same run: CPU time of the crypto
// one operation cannot avoid, and the latency of one durable write.
type Floors struct {
	// EnrollCPU: parse and verify a P-256 CSR, issue and sign the device
	// certificate (pki.Issuer.IssueDevice): the crypto of one enrollment.
	EnrollCPU Micros `json:"enroll_cpu_us"`
	// ESTHandshakeCPU: server side of a TLS 1.3 handshake without client
	// certificate, the cost of the new HTTPS connection each enrollment
	// opens (as the agent does).
	ESTHandshakeCPU Micros `json:"est_handshake_cpu_us"`
	// HandshakeCPU: server side of a full mutual TLS 1.3 handshake with a
	// device certificate, with the gateway's configuration and the key
	// exchange the load generator offers. Measured again right before
	// fleetgate's connect storm (the value compared with it); HandshakeAtStart
	// is the first measurement, with the other floors.
	HandshakeCPU     Micros `json:"mtls_handshake_cpu_us"`
	HandshakeAtStart Micros `json:"mtls_handshake_at_start_cpu_us,omitempty"`
	// HandshakeHybridCPU: the same with X25519MLKEM768, what Go clients
	// (the agent) offer by default.
	HandshakeHybridCPU Micros `json:"mtls_handshake_hybrid_cpu_us"`
	// ResumedCPU: server side of a resumed mutual TLS 1.3 handshake.
	ResumedCPU Micros `json:"mtls_resumed_cpu_us"`
	// Fsync: one small write plus fdatasync in the gateway's data
	// directory; a bbolt commit costs two.
	Fsync Micros `json:"fsync_us"`
	// Cores available to the run.
	Cores int `json:"cores"`
	// Groups is the key exchange of HandshakeCPU.
	Groups string `json:"tls_groups"`

	remeasure func(n int) (time.Duration, error)
}

// EnrollRate is the enrollments per second the crypto alone allows on
// every core (no TLS, no disk, no load generator).
func (f Floors) EnrollRate() float64 { return perSecond(f.EnrollCPU, f.Cores) }

// EnrollRateWithTLS adds the EST handshake.
func (f Floors) EnrollRateWithTLS() float64 {
	return perSecond(f.EnrollCPU+f.ESTHandshakeCPU, f.Cores)
}

// CommitRate is the serial durable commits per second the disk allows
// (two fsyncs per bbolt commit).
func (f Floors) CommitRate() float64 { return perSecond(2*f.Fsync, 1) }

func perSecond(us Micros, cores int) float64 {
	if us <= 0 {
		return 0
	}
	return float64(cores) * 1e6 / float64(us)
}

// Micros is a duration in microseconds, as JSON shows it.
type Micros float64

func micros(d time.Duration) Micros { return Micros(float64(d.Nanoseconds()) / 1e3) }

// threadCPU is the CPU time of the calling OS thread, with the
// scheduler's nanosecond accounting (getrusage counts in ticks).
func threadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// cpuPerOp runs fn n times on one locked OS thread and returns the thread
// CPU time per call: robust to other processes sharing the cores, which
// change wall time but not the work.
func cpuPerOp(n int, fn func() error) (time.Duration, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := fn(); err != nil { // warm up
		return 0, err
	}
	t0 := threadCPU()
	for range n {
		if err := fn(); err != nil {
			return 0, err
		}
	}
	return (threadCPU() - t0) / time.Duration(n), nil
}

// MeasureFloors measures the floors with the CA and server certificate of
// the gateway data directory l; groups is the key exchange the load
// generator offers. n scales the number of repetitions.
func MeasureFloors(l pki.Layout, groups []tls.CurveID, groupName string, n int) (Floors, error) {
	fl := Floors{Cores: runtime.NumCPU(), Groups: groupName}
	ca, err := pki.LoadIssuingCA(l)
	if err != nil {
		return fl, err
	}
	td, err := identity.TrustDomainOf(ca.Cert)
	if err != nil {
		return fl, err
	}
	issuer := &pki.Issuer{CA: ca, TrustDomain: td, CRLURLs: []string{"https://localhost:8443/crl"}}

	// One enrollment's crypto: what the gateway's authority does between
	// checking the token and committing.
	devKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fl, err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "floor-device"}}, devKey)
	if err != nil {
		return fl, err
	}
	d, err := cpuPerOp(n, func() error {
		csr, err := x509.ParseCertificateRequest(csrDER)
		if err != nil {
			return err
		}
		_, err = issuer.IssueDevice(csr, "floor-device", 30*24*time.Hour)
		return err
	})
	if err != nil {
		return fl, fmt.Errorf("enrollment floor: %w", err)
	}
	fl.EnrollCPU = micros(d)

	// TLS: the gateway's server certificate and client CA, a device
	// certificate from its CA.
	serverCert, err := tls.LoadX509KeyPair(l.ServerCert(), l.ServerKey())
	if err != nil {
		return fl, fmt.Errorf("server certificate: %w", err)
	}
	leaf, err := issuer.IssueIdentity(devKey.Public(), identity.Device(td, "floor-device"), time.Hour)
	if err != nil {
		return fl, err
	}
	devCert := tls.Certificate{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: devKey, Leaf: leaf}
	clientCAs := pki.NewPool(ca.Cert)
	roots := pki.NewPool(append([]*x509.Certificate{ca.Cert}, ca.Chain...)...)
	// The gateway verifies the client's certificate alone against its
	// CA (pki.LeafClientAuth: one signature check, whatever chain the
	// client sends) and refuses revoked serials (a map lookup).
	mtls := pki.LeafClientAuth(&tls.Config{
		MinVersion:       tls.VersionTLS12,
		Certificates:     []tls.Certificate{serverCert},
		ClientCAs:        clientCAs,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		VerifyConnection: func(tls.ConnectionState) error { return nil },
	})
	client := func(g []tls.CurveID, cache tls.ClientSessionCache, cert bool) *tls.Config {
		c := &tls.Config{RootCAs: roots, ServerName: "localhost", CurvePreferences: g, ClientSessionCache: cache}
		if cert {
			c.Certificates = []tls.Certificate{devCert}
		}
		return c
	}
	hs := n / 2
	if d, err = handshakeCPU(hs, mtls, client(groups, nil, true), false); err != nil {
		return fl, fmt.Errorf("mTLS handshake floor: %w", err)
	}
	fl.HandshakeCPU = micros(d)
	fl.HandshakeAtStart = fl.HandshakeCPU
	if d, err = handshakeCPU(hs, mtls, client([]tls.CurveID{tls.X25519MLKEM768}, nil, true), false); err != nil {
		return fl, fmt.Errorf("hybrid mTLS handshake floor: %w", err)
	}
	fl.HandshakeHybridCPU = micros(d)
	if d, err = handshakeCPU(hs, mtls, client(groups, tls.NewLRUClientSessionCache(1), true), true); err != nil {
		return fl, fmt.Errorf("resumed mTLS handshake floor: %w", err)
	}
	fl.ResumedCPU = micros(d)
	est := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{serverCert}}
	if d, err = handshakeCPU(hs, est, client(groups, nil, false), false); err != nil {
		return fl, fmt.Errorf("EST handshake floor: %w", err)
	}
	fl.ESTHandshakeCPU = micros(d)

	if d, err = fsyncLatency(l.Dir, max(n/4, 20)); err != nil {
		return fl, err
	}
	fl.Fsync = micros(d)
	fl.remeasure = func(n int) (time.Duration, error) {
		return handshakeCPU(n, mtls, client(groups, nil, true), false)
	}
	return fl, nil
}

// RemeasureHandshake measures the full mTLS handshake floor again with n
// handshakes. CPU time per operation drifts with what else the host runs
// (a shared vCPU slows every instruction), so the floor a connect storm is
// compared with is taken right before it.
func (f *Floors) RemeasureHandshake(n int) error {
	if f.remeasure == nil {
		return errors.New("floors not measured")
	}
	d, err := f.remeasure(n)
	if err != nil {
		return fmt.Errorf("mTLS handshake floor: %w", err)
	}
	f.HandshakeCPU = micros(d)
	return nil
}

// handshakeCPU times the server side of n TLS handshakes over Unix socket
// pairs: the server runs on one locked thread whose CPU time is measured,
// the client on others. With resume, each handshake must resume the
// previous session.
func handshakeCPU(n int, server, client *tls.Config, resume bool) (time.Duration, error) {
	one := func(mustResume bool) error {
		sc, cc, err := socketPair()
		if err != nil {
			return err
		}
		errc := make(chan error, 1)
		var resumed bool
		go func() {
			c := tls.Client(cc, client)
			err := c.Handshake()
			if err == nil {
				resumed = c.ConnectionState().DidResume
				// Read the session tickets; returns when the server closes.
				_, _ = io.Copy(io.Discard, c)
			}
			c.Close()
			errc <- err
		}()
		s := tls.Server(sc, server)
		err = s.Handshake()
		s.Close()
		if cerr := <-errc; err == nil {
			err = cerr
		}
		if err == nil && mustResume && !resumed {
			err = errors.New("the session was not resumed")
		}
		return err
	}
	if resume {
		if err := one(false); err != nil { // the full handshake that gets a ticket
			return 0, err
		}
	}
	return cpuPerOp(n, func() error { return one(resume) })
}

// socketPair is a connected pair of Unix stream sockets: kernel-buffered
// like TCP (net.Pipe is unbuffered, and TLS 1.3 peers write at the same
// time), without TCP's cost.
func socketPair() (net.Conn, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	var conns [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			}
			return nil, nil, fmt.Errorf("socketpair: %w", err)
		}
		conns[i] = c
	}
	return conns[0], conns[1], nil
}

// fsyncLatency is the wall time of a 4 KiB write plus fdatasync in dir.
func fsyncLatency(dir string, n int) (time.Duration, error) {
	f, err := os.CreateTemp(dir, ".fsync-probe-*")
	if err != nil {
		return 0, fmt.Errorf("fsync probe: %w", err)
	}
	defer os.Remove(filepath.Clean(f.Name()))
	defer f.Close()
	page := make([]byte, 4096)
	t0 := time.Now()
	for i := range n {
		if _, err := f.WriteAt(page, int64(i%16)*4096); err != nil {
			return 0, fmt.Errorf("fsync probe: %w", err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return 0, fmt.Errorf("fsync probe: %w", err)
		}
	}
	return time.Since(t0) / time.Duration(n), nil
}
