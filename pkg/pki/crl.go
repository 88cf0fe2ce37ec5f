package pki

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"time"
)

// CRLEntry is one revoked certificate.
type CRLEntry struct {
	Serial    *big.Int
	RevokedAt time.Time
	// Reason is an RFC 5280 CRLReason code.
	Reason int
}

// CRL signs an RFC 5280 certificate revocation list with the issuing CA.
// number must increase with every CRL the CA signs.
func (is *Issuer) CRL(entries []CRLEntry, number *big.Int, thisUpdate, nextUpdate time.Time) ([]byte, error) {
	list := &x509.RevocationList{
		Number:     number,
		ThisUpdate: thisUpdate.UTC(),
		NextUpdate: nextUpdate.UTC(),
	}
	for _, e := range entries {
		list.RevokedCertificateEntries = append(list.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber:   e.Serial,
			RevocationTime: e.RevokedAt.UTC(),
			ReasonCode:     e.Reason,
		})
	}
	der, err := x509.CreateRevocationList(rand.Reader, list, is.CA.Cert, is.CA.Signer)
	if err != nil {
		return nil, fmt.Errorf("sign CRL: %w", err)
	}
	return der, nil
}

// EncodeCRLPEM wraps a DER CRL in PEM.
func EncodeCRLPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})
}
