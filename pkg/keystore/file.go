package keystore

import (
	"crypto"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/fleetgate/fleetgate/pkg/pki"
)

// FileStore keeps an ECDSA P-256 key as a PKCS#8 PEM file with mode 0600.
type FileStore struct {
	// Path of the current key; the pending key is Path + ".next".
	Path string
}

var _ Store = (*FileStore)(nil)

// NewFileStore returns a store keeping its key at path.
func NewFileStore(path string) *FileStore { return &FileStore{Path: path} }

// Kind implements Store.
func (s *FileStore) Kind() string { return "file" }

func (s *FileStore) pending() string { return s.Path + ".next" }

// Load implements Store.
func (s *FileStore) Load() (crypto.Signer, error) { return s.read(s.Path) }

// LoadPending implements Store.
func (s *FileStore) LoadPending() (crypto.Signer, error) { return s.read(s.pending()) }

func (s *FileStore) read(path string) (crypto.Signer, error) {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w at %s", ErrNoKey, path)
	}
	if err := pki.CheckKeyFileMode(path); err != nil {
		return nil, err
	}
	return pki.ReadKeyFile(path)
}

// Generate implements Store.
func (s *FileStore) Generate() (crypto.Signer, error) {
	key, err := pki.GenerateKey(pki.P256)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	if err := pki.WriteKeyFile(s.pending(), key); err != nil {
		return nil, err
	}
	return key, nil
}

// Commit implements Store.
func (s *FileStore) Commit() error {
	if err := os.Rename(s.pending(), s.Path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("commit key: %w", ErrNoKey)
		}
		return fmt.Errorf("commit key: %w", err)
	}
	return nil
}

// Discard implements Store.
func (s *FileStore) Discard() error {
	if err := os.Remove(s.pending()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("discard pending key: %w", err)
	}
	return nil
}

// Close implements Store.
func (s *FileStore) Close() error { return nil }
