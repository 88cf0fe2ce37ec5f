package keystore

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// Errors of the TPM store. Each names the step that gets the device going
// again; they are wrapped with the path and the TPM's own response code.
var (
	// ErrTPMUnavailable: the TPM device node or swtpm socket is missing,
	// cannot be opened or does not answer.
	ErrTPMUnavailable = errors.New("TPM unavailable (check that the device node exists and the agent may open it, e.g. is in group tss, or that swtpm is running)")
	// ErrTPMLockout: the TPM refuses authorizations because of its
	// dictionary-attack protection.
	ErrTPMLockout = errors.New("TPM is in dictionary-attack lockout; wait or clear the lockout (tpm2_dictionarylockout -c)")
	// ErrKeyUnusable: the key blob on disk cannot be loaded, because it is
	// corrupt, the TPM was cleared or it belongs to another TPM. The key is
	// lost for good.
	ErrKeyUnusable = errors.New("cannot be loaded by this TPM (was it cleared?): re-enroll the device with a new token")
)

// errStoreClosed is returned by keys of a closed store.
var errStoreClosed = errors.New("TPM key store is closed")

// errBadSignature: the TPM answered with a signature that does not verify
// under the key's public key, e.g. because a stale handle named another
// object after an swtpm restart.
var errBadSignature = errors.New("TPM returned a signature that does not verify")

// TPMKeyFile is the name of the current key blob in the state directory;
// the pending key is TPMKeyFile + ".next".
//
// The blob is JSON, written 0600:
//
//	{"format":"fleetgate-tpm-key/v1","parent":"owner-ecc-p256-srk",
//	 "public":"<base64 TPM2B_PUBLIC>","private":"<base64 TPM2B_PRIVATE>"}
//
// public and private are the marshalled TPM2B structures (size-prefixed,
// the encoding tpm2-tools uses for the files of tpm2_create -u/-r), under
// the SRK that CreatePrimary makes from tpm2.ECCSRKTemplate in the owner
// hierarchy. Keeping both halves in one file makes Commit a single rename:
// a crash can never pair the public half of one key with the private half
// of another.
const TPMKeyFile = "device.tpm"

const (
	tpmBlobFormat = "fleetgate-tpm-key/v1"
	tpmBlobParent = "owner-ecc-p256-srk"

	// tpmRetries bounds the retries of a command the TPM asks to repeat
	// (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING); tpmBackoff is the
	// first wait, doubled each time.
	tpmRetries = 5
	tpmBackoff = 5 * time.Millisecond
)

// deviceKeyTemplate is the device identity key: ECDSA P-256 with SHA-256,
// created in and bound to this TPM (FixedTPM, FixedParent,
// SensitiveDataOrigin), usable with an empty password (UserWithAuth) and
// exempt from dictionary-attack counting (NoDA), so power cuts that the TPM
// counts as failed authorizations cannot lock the device out.
var deviceKeyTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// TPMStore keeps the device key inside a TPM 2.0. The private key never
// leaves the TPM: the state directory holds only the key blob, which is
// encrypted and integrity-protected by the TPM's storage root key (SRK) and
// useless elsewhere. The SRK is re-created on demand from the standard ECC
// SRK template; that is deterministic, so nothing needs to be persisted in
// the TPM.
//
// One mutex serializes every TPM command of the store and of its keys (TPM
// transports are not safe for concurrent use). The most recently used key
// stays loaded so repeated signatures cost one TPM command; every other
// transient object is flushed before the operation returns, so the store
// holds at most one TPM object slot between calls (two during one).
type TPMStore struct {
	dir  string
	path string // the TPM device or socket, for messages

	mu  sync.Mutex
	tpm transport.TPMCloser // nil once closed
	hot loadedKey
}

var _ Store = (*TPMStore)(nil)

// loadedKey is the key left loaded in the TPM; priv is nil when none is.
type loadedKey struct {
	priv   []byte // the key's private blob, which identifies it
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
}

// NewTPMStore returns a store over an open TPM connection, keeping key blobs
// in dir. The store owns t and closes it in Close. OpenTPM opens the
// connection from a path; tests hand in a simulator.
func NewTPMStore(t transport.TPMCloser, dir string) *TPMStore {
	return &TPMStore{tpm: t, dir: dir, path: "(given transport)"}
}

// probe checks that the TPM answers, starting it up if nobody has (an
// swtpm run without --flags startup-clear).
func (s *TPMStore) probe() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	caps := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(tpm2.TPMPTManufacturer),
		PropertyCount: 1,
	}
	_, err := retry(func() (*tpm2.GetCapabilityResponse, error) { return caps.Execute(s.tpm) })
	if errors.Is(err, tpm2.TPMRCInitialize) {
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(s.tpm); err != nil {
			return fmt.Errorf("no TPM at %s: TPM2_Startup: %w: %w", s.path, ErrTPMUnavailable, err)
		}
		_, err = retry(func() (*tpm2.GetCapabilityResponse, error) { return caps.Execute(s.tpm) })
	}
	if err != nil {
		// A TPM response code here means something answered, but not as
		// a working TPM 2.0 (a TPM 1.2, or one in failure mode).
		return fmt.Errorf("no TPM at %s: %w: %w", s.path, ErrTPMUnavailable, err)
	}
	return nil
}

// Kind implements Store.
func (s *TPMStore) Kind() string { return "tpm" }

func (s *TPMStore) current() string { return filepath.Join(s.dir, TPMKeyFile) }

func (s *TPMStore) pending() string { return s.current() + ".next" }

// Load implements Store. It loads the blob into the TPM, so a key the TPM
// can no longer use (ErrKeyUnusable) shows at start-up, not at the first
// TLS handshake.
func (s *TPMStore) Load() (crypto.Signer, error) { return s.read(s.current()) }

// LoadPending implements Store.
func (s *TPMStore) LoadPending() (crypto.Signer, error) { return s.read(s.pending()) }

func (s *TPMStore) read(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s", ErrNoKey, path)
	}
	if err != nil {
		return nil, fmt.Errorf("read TPM key: %w", err)
	}
	b, err := parseTPMBlob(data)
	if err != nil {
		return nil, unusable(path, err)
	}
	k := &tpmKey{s: s, path: path, blob: b}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tpm == nil {
		return nil, errStoreClosed
	}
	// Always load afresh: this is where a cleared TPM must show.
	s.flushHot()
	if err := s.loadHot(k); err != nil {
		return nil, err
	}
	rp, err := retry(func() (*tpm2.ReadPublicResponse, error) {
		return tpm2.ReadPublic{ObjectHandle: s.hot.handle}.Execute(s.tpm)
	})
	if err != nil {
		return nil, s.tpmErr("read public key", err)
	}
	if !bytes.Equal(tpm2.Marshal(rp.OutPublic), b.pub) {
		return nil, unusable(path, errors.New("the TPM reports another public key than the blob holds"))
	}
	return k, nil
}

// Generate implements Store: it creates a new key in the TPM, writes its
// blob as the pending key and leaves it loaded for the CSR that follows.
func (s *TPMStore) Generate() (crypto.Signer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tpm == nil {
		return nil, errStoreClosed
	}
	s.flushHot()
	srk, err := s.createSRK()
	if err != nil {
		return nil, err
	}
	defer s.flush(srk.ObjectHandle)
	create := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(deviceKeyTemplate),
	}
	rsp, err := retry(func() (*tpm2.CreateResponse, error) { return create.Execute(s.tpm) })
	if err != nil {
		return nil, s.tpmErr("create TPM key", err)
	}
	data, err := json.Marshal(tpmBlobFile{
		Format:  tpmBlobFormat,
		Parent:  tpmBlobParent,
		Public:  tpm2.Marshal(rsp.OutPublic),
		Private: tpm2.Marshal(rsp.OutPrivate),
	})
	if err != nil {
		return nil, fmt.Errorf("encode TPM key: %w", err)
	}
	// Parse what will be on disk, so the key in hand is exactly the key
	// Load will see.
	b, err := parseTPMBlob(data)
	if err != nil {
		return nil, fmt.Errorf("created TPM key: %w", err)
	}
	k := &tpmKey{s: s, path: s.pending(), blob: b}
	if err := s.loadUnder(srk, k); err != nil {
		return nil, err
	}
	if err := pki.WriteFileAtomic(s.pending(), data, 0o600); err != nil {
		return nil, err
	}
	return k, nil
}

// Commit implements Store. One rename moves both halves of the key.
func (s *TPMStore) Commit() error {
	if err := os.Rename(s.pending(), s.current()); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("commit TPM key: %w", ErrNoKey)
		}
		return fmt.Errorf("commit TPM key: %w", err)
	}
	if d, err := os.Open(s.dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// Discard implements Store.
func (s *TPMStore) Discard() error {
	if err := os.Remove(s.pending()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("discard pending TPM key: %w", err)
	}
	return nil
}

// Close implements Store: it flushes the loaded key and closes the TPM
// connection. Keys of a closed store fail to sign. Closing twice is a no-op.
func (s *TPMStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tpm == nil {
		return nil
	}
	s.flushHot()
	err := s.tpm.Close()
	s.tpm = nil
	if err != nil {
		return fmt.Errorf("close TPM: %w", err)
	}
	return nil
}

// createSRK creates the owner hierarchy's ECC storage root key. The caller
// flushes it.
func (s *TPMStore) createSRK() (*tpm2.CreatePrimaryResponse, error) {
	cp := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}
	rsp, err := retry(func() (*tpm2.CreatePrimaryResponse, error) { return cp.Execute(s.tpm) })
	if err != nil {
		if errors.Is(err, tpm2.TPMRCBadAuth) || errors.Is(err, tpm2.TPMRCAuthFail) {
			return nil, fmt.Errorf("create storage root key: the owner hierarchy has a password; the TPM key store needs an empty owner password (tpm2_changeauth -c owner -p OLD): %w", err)
		}
		return nil, s.tpmErr("create storage root key", err)
	}
	return rsp, nil
}

// loadHot loads k under a fresh SRK and keeps it loaded. The caller holds
// mu and has flushed the previous loaded key.
func (s *TPMStore) loadHot(k *tpmKey) error {
	srk, err := s.createSRK()
	if err != nil {
		return err
	}
	defer s.flush(srk.ObjectHandle)
	return s.loadUnder(srk, k)
}

// loadUnder loads k under srk and keeps it loaded.
func (s *TPMStore) loadUnder(srk *tpm2.CreatePrimaryResponse, k *tpmKey) error {
	load := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    tpm2.TPM2BPrivate{Buffer: k.blob.privBuf},
		InPublic:     k.blob.public,
	}
	rsp, err := retry(func() (*tpm2.LoadResponse, error) { return load.Execute(s.tpm) })
	if err != nil {
		if keyRejected(err) {
			return unusable(k.path, err)
		}
		return s.tpmErr("load TPM key", err)
	}
	s.hot = loadedKey{priv: k.blob.priv, handle: rsp.ObjectHandle, name: rsp.Name}
	return nil
}

// flushHot flushes the loaded key, if any.
func (s *TPMStore) flushHot() {
	if s.hot.priv != nil {
		s.flush(s.hot.handle)
		s.hot = loadedKey{}
	}
}

// flush flushes a transient object. Failure leaves nothing to do: the
// object is gone with the next TPM reset, and a caller that needs the slot
// will see TPM_RC_OBJECT_MEMORY.
func (s *TPMStore) flush(h tpm2.TPMHandle) {
	_, _ = retry(func() (*tpm2.FlushContextResponse, error) {
		return tpm2.FlushContext{FlushHandle: h}.Execute(s.tpm)
	})
}

// sign signs digest with k. The caller holds mu.
func (s *TPMStore) sign(k *tpmKey, digest []byte) ([]byte, error) {
	sig, reused, err := s.signOnce(k, digest)
	if err != nil && reused && !errors.Is(err, ErrTPMLockout) && !errors.Is(err, ErrTPMUnavailable) {
		// The kept handle may be stale: an swtpm restart forgets
		// transient objects (and may hand the number to another object).
		// Forget it and try once more with a fresh load.
		if staleHandle(err) {
			s.hot = loadedKey{} // not ours any more: do not flush
		} else {
			s.flushHot()
		}
		sig, _, err = s.signOnce(k, digest)
	}
	return sig, err
}

// signOnce signs with k, loading it unless it is the loaded key already
// (reused).
func (s *TPMStore) signOnce(k *tpmKey, digest []byte) (sig []byte, reused bool, err error) {
	if s.tpm == nil {
		return nil, false, errStoreClosed
	}
	reused = s.hot.priv != nil && bytes.Equal(s.hot.priv, k.blob.priv)
	if !reused {
		s.flushHot()
		if err := s.loadHot(k); err != nil {
			return nil, false, err
		}
	}
	cmd := tpm2.Sign{
		KeyHandle: tpm2.AuthHandle{Handle: s.hot.handle, Name: s.hot.name, Auth: tpm2.PasswordAuth(nil)},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256}),
		},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}
	rsp, err := retry(func() (*tpm2.SignResponse, error) { return cmd.Execute(s.tpm) })
	if err != nil {
		return nil, reused, s.tpmErr("TPM sign", err)
	}
	ecc, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, reused, fmt.Errorf("TPM sign: %w", err)
	}
	sig, err = asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(ecc.SignatureR.Buffer),
		new(big.Int).SetBytes(ecc.SignatureS.Buffer),
	})
	if err != nil {
		return nil, reused, fmt.Errorf("TPM sign: %w", err)
	}
	// A signature costs the TPM milliseconds and the check microseconds:
	// never hand out a signature by the wrong object or a faulty TPM.
	if !ecdsa.VerifyASN1(k.blob.ecdsa, digest, sig) {
		return nil, reused, errBadSignature
	}
	return sig, reused, nil
}

// tpmErr wraps a failed TPM command: lockout and transport failures get
// their sentinel errors.
func (s *TPMStore) tpmErr(op string, err error) error {
	var rc tpm2.TPMRC
	switch {
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("%s: %w: %w", op, ErrTPMLockout, err)
	case !errors.As(err, &rc):
		// No TPM response code: the transport failed (socket refused,
		// device gone).
		return fmt.Errorf("%s: no TPM at %s: %w: %w", op, s.path, ErrTPMUnavailable, err)
	default:
		return fmt.Errorf("%s: %w", op, err)
	}
}

func unusable(path string, err error) error {
	return fmt.Errorf("the key in %s %w: %w", path, ErrKeyUnusable, err)
}

// keyRejected reports whether the TPM refused the key material itself: a
// format-1 error about a parameter (TPM_RC_INTEGRITY, TPM_RC_ATTRIBUTES...)
// or TPM_RC_SENSITIVE, as opposed to a TPM state such as lockout or full
// object memory, or a problem with the parent handle or its session.
func keyRejected(err error) bool {
	var f1 tpm2.TPMFmt1Error
	if errors.As(err, &f1) {
		param, _ := f1.Parameter()
		return param
	}
	return errors.Is(err, tpm2.TPMRCSensitive)
}

// staleHandle reports whether err says the handle names no loaded object.
func staleHandle(err error) bool {
	if errors.Is(err, errBadSignature) || errors.Is(err, tpm2.TPMRCReferenceH0) {
		return true
	}
	var f1 tpm2.TPMFmt1Error
	if errors.As(err, &f1) {
		if h, _ := f1.Handle(); h {
			return true
		}
	}
	return false
}

// retry runs a TPM command again while the TPM answers that it is busy.
func retry[R any](cmd func() (*R, error)) (*R, error) {
	wait := tpmBackoff
	for i := 0; ; i++ {
		rsp, err := cmd()
		if err == nil || i == tpmRetries ||
			!(errors.Is(err, tpm2.TPMRCRetry) || errors.Is(err, tpm2.TPMRCYielded) || errors.Is(err, tpm2.TPMRCTesting)) {
			return rsp, err
		}
		time.Sleep(wait)
		wait *= 2
	}
}

// tpmBlobFile is the JSON form of a key blob; see TPMKeyFile.
type tpmBlobFile struct {
	Format  string `json:"format"`
	Parent  string `json:"parent"`
	Public  []byte `json:"public"`
	Private []byte `json:"private"`
}

// tpmBlob is a parsed, checked key blob.
type tpmBlob struct {
	pub     []byte // marshalled TPM2B_PUBLIC
	priv    []byte // marshalled TPM2B_PRIVATE
	privBuf []byte // the TPM2B_PRIVATE's contents
	public  tpm2.TPM2BPublic
	ecdsa   *ecdsa.PublicKey
}

// parseTPMBlob decodes a key blob and checks that it holds a device key as
// deviceKeyTemplate describes. The TPM checks the rest when loading it.
func parseTPMBlob(data []byte) (*tpmBlob, error) {
	var f tpmBlobFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("decode key blob: %w", err)
	}
	if f.Format != tpmBlobFormat {
		return nil, fmt.Errorf("key blob format %q, want %q", f.Format, tpmBlobFormat)
	}
	if f.Parent != tpmBlobParent {
		return nil, fmt.Errorf("key blob parent %q, want %q", f.Parent, tpmBlobParent)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](f.Public)
	if err != nil || !bytes.Equal(tpm2.Marshal(pub), f.Public) {
		return nil, fmt.Errorf("key blob: malformed public area: %v", err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](f.Private)
	if err != nil || len(priv.Buffer) == 0 || !bytes.Equal(tpm2.Marshal(priv), f.Private) {
		return nil, fmt.Errorf("key blob: malformed private area: %v", err)
	}
	key, err := devicePublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("key blob: %w", err)
	}
	return &tpmBlob{pub: f.Public, priv: f.Private, privBuf: priv.Buffer, public: *pub, ecdsa: key}, nil
}

// devicePublicKey returns the public key of a device key's public area, or
// an error if the area describes another kind of object.
func devicePublicKey(pub *tpm2.TPM2BPublic) (*ecdsa.PublicKey, error) {
	area, err := pub.Contents()
	if err != nil {
		return nil, fmt.Errorf("public area: %w", err)
	}
	a := area.ObjectAttributes
	if area.Type != tpm2.TPMAlgECC || !a.SignEncrypt || a.Decrypt || a.Restricted || !a.FixedTPM {
		return nil, errors.New("not an ECDSA signing key bound to the TPM")
	}
	parms, err := area.Parameters.ECCDetail()
	if err != nil {
		return nil, err
	}
	if parms.CurveID != tpm2.TPMECCNistP256 || parms.Scheme.Scheme != tpm2.TPMAlgECDSA {
		return nil, errors.New("not an ECDSA P-256 key")
	}
	if scheme, err := parms.Scheme.Details.ECDSA(); err != nil || scheme.HashAlg != tpm2.TPMAlgSHA256 {
		return nil, errors.New("not an ECDSA key with SHA-256")
	}
	point, err := area.Unique.ECC()
	if err != nil {
		return nil, err
	}
	x, y := point.X.Buffer, point.Y.Buffer
	if len(x) > 32 || len(y) > 32 {
		return nil, errors.New("public point too long for P-256")
	}
	// 0x04 || X || Y, each left-padded: the parser checks the point is on
	// the curve.
	raw := make([]byte, 65)
	raw[0] = 4
	copy(raw[33-len(x):33], x)
	copy(raw[65-len(y):], y)
	key, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), raw)
	if err != nil {
		return nil, fmt.Errorf("public point: %w", err)
	}
	return key, nil
}

// tpmKey is a key held by a TPMStore. It stays usable after Commit or
// Discard moves or removes its file: it carries its own blob.
type tpmKey struct {
	s    *TPMStore
	path string // where the blob was (or is to be) found, for messages
	blob *tpmBlob
}

// Public implements crypto.Signer; the key is an *ecdsa.PublicKey.
func (k *tpmKey) Public() crypto.PublicKey { return k.blob.ecdsa }

// Sign implements crypto.Signer. The TPM signs a SHA-256 digest and the
// result is an ASN.1 DER ECDSA signature, as x509 and crypto/tls expect;
// rand is unused (the TPM draws its own nonce). The key works as
// tls.Certificate.PrivateKey for TLS 1.3 (ECDSA P-256 always uses SHA-256)
// and TLS 1.2; for a TLS 1.2 peer that might prefer SHA-384, set
// tls.Certificate.SupportedSignatureAlgorithms to
// []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}.
func (k *tpmKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil || opts.HashFunc() != crypto.SHA256 {
		var h crypto.Hash
		if opts != nil {
			h = opts.HashFunc()
		}
		return nil, fmt.Errorf("TPM key signs SHA-256 digests only (ECDSA P-256 with SHA-256), not %v", h)
	}
	if len(digest) != sha256.Size {
		return nil, fmt.Errorf("TPM key: digest is %d bytes, want %d for SHA-256", len(digest), sha256.Size)
	}
	k.s.mu.Lock()
	defer k.s.mu.Unlock()
	return k.s.sign(k, digest)
}
