package keystore

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// Pure-Go tests of the TPM store's error handling and blob parsing; the
// behaviour against a TPM is tested on the simulator (tpm_sim_test.go, tag
// tpmsimulator) and on swtpm (tpm_swtpm_test.go).

// fakeTPM answers every command with rc, or fails with err.
type fakeTPM struct {
	rc    tpm2.TPMRC
	err   error
	sends atomic.Int32
}

func (f *fakeTPM) Send([]byte) ([]byte, error) {
	f.sends.Add(1)
	if f.err != nil {
		return nil, f.err
	}
	rsp := make([]byte, 10)
	binary.BigEndian.PutUint16(rsp[0:], uint16(tpm2.TPMSTNoSessions))
	binary.BigEndian.PutUint32(rsp[2:], 10)
	binary.BigEndian.PutUint32(rsp[6:], uint32(f.rc))
	return rsp, nil
}

func (f *fakeTPM) Close() error { return nil }

func TestTPMErrors(t *testing.T) {
	const (
		rcS        = 0x800 // session-related format-1 error
		rcSession1 = 0x100
	)
	for _, tc := range []struct {
		name      string
		tpm       *fakeTPM
		want      error
		wantText  string
		wantSends int32
	}{
		{"lockout names the recovery step", &fakeTPM{rc: tpm2.TPMRCLockout}, ErrTPMLockout, "tpm2_dictionarylockout -c", 1},
		{"transport failure is an unavailable TPM", &fakeTPM{err: errors.New("connection refused")}, ErrTPMUnavailable, "connection refused", 1},
		{"TPM_RC_RETRY is retried, then reported", &fakeTPM{rc: tpm2.TPMRCRetry}, nil, "TPM_RC_RETRY", tpmRetries + 1},
		{"TPM_RC_YIELDED is retried", &fakeTPM{rc: tpm2.TPMRCYielded}, nil, "TPM_RC_YIELDED", tpmRetries + 1},
		{"TPM_RC_TESTING is retried", &fakeTPM{rc: tpm2.TPMRCTesting}, nil, "TPM_RC_TESTING", tpmRetries + 1},
		{"object memory full is not retried", &fakeTPM{rc: tpm2.TPMRCObjectMemory}, nil, "TPM_RC_OBJECT_MEMORY", 1},
		{"owner password set", &fakeTPM{rc: tpm2.TPMRCBadAuth + rcS + rcSession1}, nil, "empty owner password", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewTPMStore(tc.tpm, t.TempDir())
			defer s.Close()
			_, err := s.Generate()
			if err == nil {
				t.Fatal("Generate succeeded")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("error %q lacks %q", err, tc.wantText)
			}
			if n := tc.tpm.sends.Load(); n != tc.wantSends {
				t.Errorf("%d commands sent, want %d", n, tc.wantSends)
			}
		})
	}
}

func TestTPMProbe(t *testing.T) {
	// Something answers, but not as a working TPM 2.0.
	s := NewTPMStore(&fakeTPM{rc: tpm2.TPMRCFailure}, t.TempDir())
	s.path = "/dev/tpm0"
	if err := s.probe(); !errors.Is(err, ErrTPMUnavailable) || !strings.Contains(err.Error(), "/dev/tpm0") {
		t.Fatalf("got %v, want ErrTPMUnavailable naming the device", err)
	}
}

func TestTPMClosedStore(t *testing.T) {
	s := NewTPMStore(&fakeTPM{}, t.TempDir())
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Generate(); err == nil {
		t.Fatal("Generate on a closed store succeeded")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// publicArea marshals a TPM2B_PUBLIC for template with key's point.
func publicArea(t testing.TB, template tpm2.TPMTPublic, key *ecdsa.PublicKey) []byte {
	t.Helper()
	raw, err := key.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	template.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: raw[1:33]},
		Y: tpm2.TPM2BECCParameter{Buffer: raw[33:]},
	})
	return tpm2.Marshal(tpm2.New2B(template))
}

func blobJSON(t testing.TB, pub []byte) []byte {
	t.Helper()
	data, err := json.Marshal(tpmBlobFile{
		Format:  tpmBlobFormat,
		Parent:  tpmBlobParent,
		Public:  pub,
		Private: tpm2.Marshal(tpm2.TPM2BPrivate{Buffer: []byte("opaque to anyone but the TPM")}),
	})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestParseTPMBlob(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good := publicArea(t, deviceKeyTemplate, &priv.PublicKey)
	b, err := parseTPMBlob(blobJSON(t, good))
	if err != nil {
		t.Fatalf("device key blob: %v", err)
	}
	if !b.ecdsa.Equal(&priv.PublicKey) {
		t.Fatal("parsed public key differs")
	}

	noDecrypt := deviceKeyTemplate
	noDecrypt.ObjectAttributes.Decrypt = true
	sha384 := deviceKeyTemplate
	sha384.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA384}),
		},
		CurveID: tpm2.TPMECCNistP256,
	})
	offCurve := tpm2.Marshal(tpm2.New2B(deviceKeyTemplate)) // point (0, 0)
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"storage root key", blobJSON(t, publicArea(t, tpm2.ECCSRKTemplate, &priv.PublicKey))},
		{"signing and decryption key", blobJSON(t, publicArea(t, noDecrypt, &priv.PublicKey))},
		{"ECDSA with SHA-384", blobJSON(t, publicArea(t, sha384, &priv.PublicKey))},
		{"RSA key", blobJSON(t, tpm2.Marshal(tpm2.New2B(tpm2.RSASRKTemplate)))},
		{"point off the curve", blobJSON(t, offCurve)},
		{"trailing bytes after the public area", blobJSON(t, append(good, 0))},
		{"not JSON", []byte("-----BEGIN EC PRIVATE KEY-----")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := parseTPMBlob(tc.data); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func FuzzParseTPMBlob(f *testing.F) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(blobJSON(f, publicArea(f, deviceKeyTemplate, &priv.PublicKey)))
	f.Add(blobJSON(f, tpm2.Marshal(tpm2.New2B(tpm2.RSASRKTemplate))))
	f.Add([]byte(`{"format":"fleetgate-tpm-key/v1","parent":"owner-ecc-p256-srk","public":"AAA=","private":""}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := parseTPMBlob(data)
		if err == nil && (b.ecdsa == nil || len(b.privBuf) == 0) {
			t.Fatal("accepted a blob without a key")
		}
	})
}
