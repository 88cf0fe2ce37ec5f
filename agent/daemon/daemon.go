// Package daemon is the agent's main loop: keep the device enrolled,
// connect to the broker with mutual TLS, publish telemetry, take commands,
// renew the certificate before it expires, and stop for good when the
// gateway has revoked the device.
package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/fleetgate/fleetgate/agent/config"
	"github.com/fleetgate/fleetgate/agent/credential"
	"github.com/fleetgate/fleetgate/agent/spool"
	"github.com/fleetgate/fleetgate/agent/telemetry"
	"github.com/fleetgate/fleetgate/pkg/cli"
	"github.com/fleetgate/fleetgate/pkg/est"
	"github.com/fleetgate/fleetgate/pkg/keystore"
	"github.com/fleetgate/fleetgate/pkg/pki"
	"github.com/fleetgate/fleetgate/pkg/topic"
)

// Errors that end the agent for good; the caller maps them to exit codes
// so a service manager does not restart it in a loop.
var (
	// ErrRevoked: the gateway revoked this device. Only a new identity
	// (new token, and for a stolen device a new device) brings it back.
	ErrRevoked = errors.New("device revoked by the gateway")
	// ErrEnrollRefused: the gateway refused the token or the request; a
	// retry cannot succeed without a new token.
	ErrEnrollRefused = errors.New("enrollment refused")
)

// renewJitter moves each device's renewal earlier by up to this fraction of
// the certificate lifetime.
const renewJitter = 0.05

// Daemon runs one device.
type Daemon struct {
	cfg   config.Config
	log   *slog.Logger
	store *credential.Store
	keys  keystore.Store
	roots *x509.CertPool
	trust []*x509.Certificate

	cur     atomic.Pointer[credential.Credential]
	tlsCert atomic.Pointer[tls.Certificate]
	sources telemetry.Sources
	exec    *telemetry.Exec
	drops   dropLog
}

// OpenKeys opens the key store cfg names.
func OpenKeys(cfg config.Config) (keystore.Store, error) {
	switch cfg.Key {
	case config.KeyFile:
		return keystore.NewFileStore(cfg.StateDir + "/device.key"), nil
	case config.KeyTPM:
		return openTPM(cfg)
	default:
		return nil, fmt.Errorf("unknown key store %q", cfg.Key)
	}
}

// New prepares the state directory, the key store and the trust bundle, and
// finishes any certificate swap a crash interrupted.
func New(cfg config.Config, log *slog.Logger) (*Daemon, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	trust, err := pki.ReadCertsFile(cfg.CA)
	if err != nil {
		return nil, fmt.Errorf("CA bundle (--ca): %w", err)
	}
	roots := pki.NewPool(trust...)
	keys, err := OpenKeys(cfg)
	if err != nil {
		return nil, err
	}
	d := &Daemon{
		cfg:     cfg,
		log:     log.With("component", "agent", "device", cfg.DeviceID),
		store:   &credential.Store{Dir: cfg.StateDir, Keys: keys, Trust: trust},
		keys:    keys,
		roots:   roots,
		trust:   trust,
		sources: telemetry.DefaultSources,
	}
	if cfg.Exec != "" {
		d.exec = &telemetry.Exec{Command: cfg.Exec, Timeout: cfg.ExecTimeout}
	}
	if err := d.store.Recover(); err != nil {
		keys.Close()
		return nil, fmt.Errorf("recover state: %w", err)
	}
	return d, nil
}

// Close releases the key store.
func (d *Daemon) Close() error { return d.keys.Close() }

func (d *Daemon) setCredential(c *credential.Credential) {
	d.cur.Store(c)
	d.tlsCert.Store(c.TLSCertificate())
}

// estClient talks to the gateway's EST service, presenting the current
// certificate when the server asks for one.
func (d *Daemon) estClient() *est.Client {
	return est.NewClient(d.cfg.Gateway, d.roots, func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if c := d.tlsCert.Load(); c != nil {
			return c, nil
		}
		return &tls.Certificate{}, nil
	})
}

// Enroll makes sure the device holds a valid certificate: it loads the one
// on disk or enrolls with the token. It reports whether it enrolled now.
func (d *Daemon) Enroll(ctx context.Context) (*credential.Credential, bool, error) {
	cred, err := d.store.Load()
	if err == nil {
		if err := d.checkCredential(cred); err != nil {
			return nil, false, err
		}
		d.setCredential(cred)
		return cred, false, nil
	}
	if !errors.Is(err, credential.ErrNotEnrolled) {
		return nil, false, err
	}
	token, err := d.cfg.ReadToken()
	if err != nil {
		return nil, false, fmt.Errorf("%w: device is not enrolled and %v", ErrEnrollRefused, err)
	}
	client := d.estClient()
	cred, err = d.store.Obtain(ctx, d.cfg.DeviceID, true, func(ctx context.Context, csr []byte) (*x509.Certificate, error) {
		return client.SimpleEnroll(ctx, csr, d.cfg.DeviceID, token)
	})
	if err != nil {
		return nil, false, classifyEnroll(err)
	}
	d.setCredential(cred)
	d.log.Info("enrolled", "serial", pki.SerialHex(cred.Cert), "not_after", cred.Cert.NotAfter, "key_store", d.keys.Kind())
	if d.cfg.TokenFile != "" && d.cfg.Token == "" && !d.cfg.KeepTokenFile {
		if err := os.Remove(d.cfg.TokenFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("could not delete the spent token file", "file", d.cfg.TokenFile, "error", err)
		}
	}
	return cred, true, nil
}

// checkCredential refuses a certificate of another device or one that has
// expired (it can no longer authenticate a renewal).
func (d *Daemon) checkCredential(c *credential.Credential) error {
	if c.Cert.Subject.CommonName != d.cfg.DeviceID {
		return fmt.Errorf("state dir %s holds the certificate of device %q, not %q", d.cfg.StateDir, c.Cert.Subject.CommonName, d.cfg.DeviceID)
	}
	if time.Now().After(c.Cert.NotAfter) {
		return fmt.Errorf("%w: certificate expired at %s; enroll again with a new token (remove %s first)", ErrEnrollRefused, c.Cert.NotAfter.Format(time.RFC3339), d.store.CertPath())
	}
	return nil
}

// classifyEnroll marks refusals no retry can fix.
func classifyEnroll(err error) error {
	var e *est.Error
	if errors.As(err, &e) && !e.Temporary() {
		if e.StatusCode == 403 && strings.Contains(e.Message, "revoked") {
			return fmt.Errorf("%w: %v", ErrRevoked, err)
		}
		return fmt.Errorf("%w: %v", ErrEnrollRefused, err)
	}
	return err
}

// permanent reports whether err ends the agent.
func permanent(err error) bool {
	return errors.Is(err, ErrRevoked) || errors.Is(err, ErrEnrollRefused)
}

// backoff yields exponentially growing waits with full jitter, so a fleet
// that lost its gateway does not come back in lockstep.
type backoff struct {
	min, max time.Duration
	cur      time.Duration
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else if b.cur < b.max {
		b.cur = min(b.cur*2, b.max)
	}
	return b.cur/2 + rand.N(b.cur/2+1)
}

func (b *backoff) reset() { b.cur = 0 }

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Run enrolls if needed, then publishes telemetry until ctx ends. It
// returns nil on a clean stop, or an error matching ErrRevoked or
// ErrEnrollRefused when it must not be restarted.
//
// Telemetry sources write into the spool from the start, enrolled and
// connected or not; a sender drains the spool whenever a session is up.
func (d *Daemon) Run(ctx context.Context) error {
	sp, err := spool.Open(d.cfg.SpoolPath(), &spool.Options{MaxBytes: int64(d.cfg.SpoolMax), MaxMessages: d.cfg.SpoolMaxMessages})
	if err != nil {
		return err
	}
	defer sp.Close()
	st, err := sp.Stats()
	if err != nil {
		return err
	}
	d.log.Info("starting", "version", cli.Version, "config", strings.Join(d.cfg.Files, ","),
		"spool", sp.Path(), "spool_pending", st.Pending, "spool_dropped", st.Dropped, "next_seq", st.NextSeq,
		"spool_max", d.cfg.SpoolMax.String(), "interval", d.cfg.Interval, "system", d.cfg.System,
		"exec", d.cfg.Exec, "local_socket", d.cfg.LocalSocket)

	ctx, cancel := context.WithCancel(ctx)
	var producers sync.WaitGroup
	// Stop the sources before the spool closes (defers run last-in first-out).
	defer producers.Wait()
	defer cancel()
	if d.cfg.LocalSocket != "" {
		ln, err := telemetry.ListenLocal(d.cfg.LocalSocket, 0o660)
		if err != nil {
			return err
		}
		srv := &telemetry.LocalServer{Store: func(ms []telemetry.LocalMessage) []error { return d.storeLocal(sp, ms) }, Log: d.log}
		producers.Go(func() {
			srv.Serve(ctx, ln)
			_ = os.Remove(d.cfg.LocalSocket)
		})
	}
	producers.Go(func() { d.sample(ctx, sp) })

	bo := backoff{min: time.Second, max: 2 * time.Minute}
	var cred *credential.Credential
	for {
		c, _, err := d.Enroll(ctx)
		if err == nil {
			cred = c
			break
		}
		if permanent(err) {
			return err
		}
		wait := bo.next()
		d.log.Warn("enrollment failed; retrying", "error", err, "in", wait.Round(time.Millisecond))
		if !sleep(ctx, wait) {
			return nil
		}
	}
	return d.forward(ctx, sp, cred)
}

// forward keeps a session to the broker and drains the spool into it, and
// renews the certificate when due.
func (d *Daemon) forward(ctx context.Context, sp *spool.Spool, cred *credential.Credential) error {
	bo := backoff{min: time.Second, max: 2 * time.Minute}
	renewAt := cred.RenewAt(d.cfg.RenewFraction, renewJitter, rand.Float64)
	renew := time.NewTimer(time.Until(renewAt))
	defer renew.Stop()
	d.log.Info("certificate", "serial", pki.SerialHex(cred.Cert), "not_after", cred.Cert.NotAfter, "renew_at", renewAt.Round(time.Second))

	for {
		// A fresh client per session: paho's own store would resend the
		// previous session's unacknowledged messages, which the spool
		// resends already.
		lost := make(chan error, 1)
		client := d.mqttClient(lost)
		if err := d.connect(ctx, client); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if err := d.checkRevoked(ctx, err); err != nil {
				return err
			}
			wait := bo.next()
			d.log.Warn("connect failed; retrying", "broker", d.cfg.MQTT, "error", err, "in", wait.Round(time.Millisecond))
			if !sleep(ctx, wait) {
				return nil
			}
			continue
		}
		bo.reset()
		d.publishState(client, sp)

		sctx, stopSending := context.WithCancel(ctx)
		sent := make(chan error, 1)
		go func() { sent <- d.drain(sctx, client, sp) }()
		err := d.session(ctx, sent, lost, renew)
		stopSending()
		if !errors.Is(err, errSenderDone) {
			<-sent
		}
		client.Disconnect(250)
		switch {
		case ctx.Err() != nil:
			d.log.Info("stopping")
			return nil
		case permanent(err):
			return err
		case errors.Is(err, errRenewed):
			// Reconnect at once so the session runs on the new certificate.
		default:
			d.log.Warn("connection lost", "error", err)
			// A short jittered pause spreads a fleet's reconnects.
			if !sleep(ctx, time.Duration(rand.Int64N(int64(time.Second)))) {
				return nil
			}
		}
	}
}

var (
	errRenewed    = errors.New("certificate renewed")
	errSenderDone = errors.New("sender stopped")
)

// session waits while a session is up, renewing the certificate when due.
// It returns why the session must end: ctx done, the connection lost, the
// sender failed (errSenderDone wraps its error), a renewal (errRenewed) or
// a permanent error.
func (d *Daemon) session(ctx context.Context, sent <-chan error, lost <-chan error, renew *time.Timer) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-lost:
			return err
		case err := <-sent:
			return fmt.Errorf("%w: %w", errSenderDone, err)
		case <-renew.C:
			next, err := d.renew(ctx)
			if err != nil {
				if permanent(err) {
					return err
				}
				retry := min(time.Until(d.cur.Load().Cert.NotAfter)/10, time.Hour)
				retry = max(retry, 5*time.Second)
				d.log.Warn("renewal failed; retrying", "error", err, "in", retry.Round(time.Second))
				renew.Reset(retry)
				continue
			}
			renewAt := next.RenewAt(d.cfg.RenewFraction, renewJitter, rand.Float64)
			renew.Reset(time.Until(renewAt))
			d.log.Info("renewed", "serial", pki.SerialHex(next.Cert), "not_after", next.Cert.NotAfter, "renew_at", renewAt.Round(time.Second))
			return errRenewed
		}
	}
}

// renew trades the current certificate for a new one (with a new key when
// configured) over EST simplereenroll.
func (d *Daemon) renew(ctx context.Context) (*credential.Credential, error) {
	client := d.estClient()
	cred, err := d.store.Obtain(ctx, d.cfg.DeviceID, d.cfg.Rekey, client.SimpleReenroll)
	if err != nil {
		err = classifyEnroll(err)
		if errors.Is(err, ErrEnrollRefused) || errors.Is(err, ErrRevoked) {
			if rerr := d.checkRevoked(ctx, err); rerr != nil {
				return nil, rerr
			}
			// Refused but not revoked (e.g. a policy change): try again
			// later rather than give up a working certificate.
			return nil, errors.Unwrap(err)
		}
		return nil, err
	}
	d.setCredential(cred)
	return cred, nil
}

// Renew renews the certificate once, now (for the "renew" command).
func (d *Daemon) Renew(ctx context.Context) (*credential.Credential, error) {
	if _, _, err := d.Enroll(ctx); err != nil {
		return nil, err
	}
	return d.renew(ctx)
}

func (d *Daemon) mqttClient(lost chan<- error) paho.Client {
	host, _, _ := net.SplitHostPort(d.cfg.MQTT)
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS12,
		RootCAs:    d.roots,
		ServerName: host,
		// Read on every (re)connect, so a renewed certificate is used
		// without rebuilding the client.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return d.tlsCert.Load(), nil
		},
	}
	commands := topic.Commands(d.cfg.DeviceID) + "/#"
	opts := paho.NewClientOptions().
		AddBroker("ssl://" + d.cfg.MQTT).
		SetClientID(d.cfg.DeviceID).
		SetTLSConfig(tlsConf).
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetKeepAlive(30 * time.Second).
		SetPingTimeout(10 * time.Second).
		SetConnectTimeout(20 * time.Second).
		SetWriteTimeout(20 * time.Second).
		SetOrderMatters(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		}).
		SetOnConnectHandler(func(c paho.Client) {
			c.Subscribe(commands, 1, d.onCommand)
		})
	return paho.NewClient(opts)
}

func (d *Daemon) connect(ctx context.Context, c paho.Client) error {
	tok := c.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := tok.Error(); err != nil {
		return err
	}
	d.log.Info("connected", "broker", d.cfg.MQTT)
	return nil
}

// checkRevoked turns a refusal that could mean revocation into ErrRevoked
// when the gateway's CRL lists this device's serial; nil otherwise.
func (d *Daemon) checkRevoked(ctx context.Context, cause error) error {
	if !refusal(cause) {
		return nil
	}
	cred := d.cur.Load()
	if cred == nil {
		return nil
	}
	if time.Now().After(cred.Cert.NotAfter) {
		return fmt.Errorf("%w: certificate expired at %s; enroll again with a new token", ErrEnrollRefused, cred.Cert.NotAfter.Format(time.RFC3339))
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// Anonymously: the gateway refuses a revoked certificate in the handshake.
	crl, err := est.NewClient(d.cfg.Gateway, d.roots, nil).CRL(cctx)
	if err != nil {
		d.log.Warn("could not fetch the CRL to check for revocation", "error", err)
		return nil
	}
	if !d.crlTrusted(crl) {
		d.log.Warn("CRL signature does not verify against the CA bundle; ignoring it")
		return nil
	}
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(cred.Cert.SerialNumber) == 0 {
			return fmt.Errorf("%w: serial %s revoked at %s (reason %s); the device needs a new identity to come back",
				ErrRevoked, pki.SerialHex(cred.Cert), e.RevocationTime.Format(time.RFC3339), pki.ReasonName(e.ReasonCode))
		}
	}
	return nil
}

func (d *Daemon) crlTrusted(crl *x509.RevocationList) bool {
	for _, ca := range d.trust {
		if crl.CheckSignatureFrom(ca) == nil {
			return true
		}
	}
	return false
}

// refusal reports whether a connect error is the gateway refusing us (TLS
// alert or CONNACK code) rather than the network failing.
func refusal(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, packets.ErrorRefusedNotAuthorised) || errors.Is(err, packets.ErrorRefusedBadUsernameOrPassword) ||
		errors.Is(err, packets.ErrorRefusedIDRejected) || errors.Is(err, ErrRevoked) || errors.Is(err, ErrEnrollRefused) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{"bad certificate", "certificate revoked", "unknown certificate", "certificate required", "not Authorized", "identifier rejected"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// State is the retained message on devices/ID/state.
type State struct {
	Agent        string    `json:"agent"`
	KeyStore     string    `json:"key_store"`
	Serial       string    `json:"serial"`
	CertNotAfter time.Time `json:"cert_not_after"`
	Since        time.Time `json:"since"`
	// Spool: messages waiting at connect time, and dropped over the bound
	// since the spool was created.
	SpoolPending int    `json:"spool_pending"`
	SpoolDropped uint64 `json:"spool_dropped"`
}

func (d *Daemon) publishState(c paho.Client, sp *spool.Spool) {
	cred := d.cur.Load()
	st, _ := sp.Stats()
	payload, _ := json.Marshal(State{
		Agent:        cli.VersionString("agent"),
		KeyStore:     d.keys.Kind(),
		Serial:       pki.SerialHex(cred.Cert),
		CertNotAfter: cred.Cert.NotAfter,
		Since:        time.Now().UTC(),
		SpoolPending: st.Pending,
		SpoolDropped: st.Dropped,
	})
	c.Publish(topic.State(d.cfg.DeviceID), 1, true, payload)
}

func (d *Daemon) onCommand(_ paho.Client, m paho.Message) {
	d.log.Info("command received", "topic", m.Topic(), "bytes", len(m.Payload()))
}

// Status describes the device's identity on disk.
type Status struct {
	DeviceID  string    `json:"device_id"`
	Enrolled  bool      `json:"enrolled"`
	KeyStore  string    `json:"key_store"`
	Serial    string    `json:"serial,omitempty"`
	Subject   string    `json:"subject,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	RenewAt   time.Time `json:"renew_after,omitzero"`
	Expired   bool      `json:"expired"`
	StateDir  string    `json:"state_dir"`
	Gateway   string    `json:"gateway"`
	MQTT      string    `json:"mqtt"`
}

// Status reads the identity on disk without contacting the gateway.
func (d *Daemon) Status() (Status, error) {
	st := Status{DeviceID: d.cfg.DeviceID, KeyStore: d.keys.Kind(), StateDir: d.cfg.StateDir, Gateway: d.cfg.Gateway, MQTT: d.cfg.MQTT}
	cred, err := d.store.Load()
	if errors.Is(err, credential.ErrNotEnrolled) {
		return st, nil
	}
	if err != nil {
		return st, err
	}
	st.Enrolled = true
	st.Serial = pki.SerialHex(cred.Cert)
	if len(cred.Cert.URIs) == 1 {
		st.Subject = cred.Cert.URIs[0].String()
	}
	st.NotBefore, st.NotAfter = cred.Cert.NotBefore, cred.Cert.NotAfter
	st.RenewAt = cred.RenewAt(d.cfg.RenewFraction, 0, func() float64 { return 0 })
	st.Expired = time.Now().After(cred.Cert.NotAfter)
	return st, nil
}
