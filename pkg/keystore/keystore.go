// Package keystore keeps a device's identity key. A key is a crypto.Signer:
// the file store keeps it in a 0600 PEM file; a TPM store keeps it inside
// the TPM, where it never leaves.
//
// Every store has one current key and at most one pending key: renewal with
// a new key generates the pending key, uses it for the CSR and, once the new
// certificate is safely on disk, commits it, so a crash at any point leaves
// a key that matches a certificate.
package keystore

import (
	"crypto"
	"errors"
)

// Errors returned by stores.
var (
	// ErrNoKey: the store holds no (current or pending) key.
	ErrNoKey = errors.New("no key")
)

// Store holds one device identity key.
type Store interface {
	// Kind names the store ("file", "tpm") for status output.
	Kind() string
	// Load returns the current key, or ErrNoKey.
	Load() (crypto.Signer, error)
	// Generate creates a new pending key, replacing any pending one.
	Generate() (crypto.Signer, error)
	// LoadPending returns the pending key, or ErrNoKey.
	LoadPending() (crypto.Signer, error)
	// Commit makes the pending key current, atomically.
	Commit() error
	// Discard deletes the pending key, if any.
	Discard() error
	// Close releases the store's resources (a TPM connection).
	Close() error
}
