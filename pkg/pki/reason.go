package pki

import (
	"fmt"
	"strings"
)

// RFC 5280 section 5.3.1 CRLReason codes a device revocation may carry.
// certificateHold and removeFromCRL are absent on purpose: revocation in
// fleetgate is permanent. cACompromise and aACompromise are about CAs.
var reasonCodes = map[string]int{
	"unspecified":          0,
	"keyCompromise":        1,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
	"privilegeWithdrawn":   9,
}

// ReasonNames lists the accepted revocation reasons.
func ReasonNames() []string {
	return []string{"unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation", "privilegeWithdrawn"}
}

// ParseReason maps an RFC 5280 reason name (case-insensitive) to its code.
// An empty name is unspecified.
func ParseReason(name string) (int, error) {
	if name == "" {
		return 0, nil
	}
	for n, c := range reasonCodes {
		if strings.EqualFold(n, name) {
			return c, nil
		}
	}
	return 0, fmt.Errorf("unknown revocation reason %q (want one of %s)", name, strings.Join(ReasonNames(), ", "))
}

// ReasonName maps a reason code to its RFC 5280 name.
func ReasonName(code int) string {
	for n, c := range reasonCodes {
		if c == code {
			return n
		}
	}
	return fmt.Sprintf("reason(%d)", code)
}
