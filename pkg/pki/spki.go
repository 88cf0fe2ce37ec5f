package pki

import (
	"encoding/asn1"
	"fmt"
)

// parseSPKI returns the subjectPublicKey bits of a DER SubjectPublicKeyInfo.
func parseSPKI(der []byte) ([]byte, error) {
	var spki struct {
		Algorithm asn1.RawValue
		PublicKey asn1.BitString
	}
	rest, err := asn1.Unmarshal(der, &spki)
	if err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("parse public key info: %v", err)
	}
	return spki.PublicKey.Bytes, nil
}
