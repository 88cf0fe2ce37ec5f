package config_test

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/fleetgate/fleetgate/agent/config"
)

// FuzzParse feeds arbitrary bytes to the config file parser: it never
// panics, every error names the file, and every setting it returns is
// keyed by a flag-style name.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"gateway: https://gateway.example:8443\ndevice_id: sensor-0042\ninterval: 30s\nqos: 1\nrekey: true\nrenew_at: 0.66\n",
		"device-id: sensor-1\n",
		"",
		"# only a comment\n",
		"---\ndevice_id: a\n---\ndevice_id: b\n",
		"device_id: [a, b]\n",
		"device_id: {a: b}\n",
		"device_id:\n",
		"- a\n- b\n",
		"just a scalar",
		"a: &x [1]\nb: *x\n",
		"? [a]\n: b\n",
		"device_id: \"\\u0000\"\n",
		"device_id: !!binary aGVsbG8=\n",
		"a: &a [*a]\n",
		"\t- tab indent\n",
		"device_id: 'unterminated\n",
		"1: one\ntrue: yes\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := config.Parse(data, "agent.yaml")
		if err != nil {
			if !strings.HasPrefix(err.Error(), "config agent.yaml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		for k := range m {
			if strings.Contains(k, "_") {
				t.Fatalf("key %q keeps an underscore; flags use '-'", k)
			}
		}
	})
}

// FuzzParseQuotedValue checks that a quoted value comes back exactly as
// written: device IDs, tokens and paths are text, whatever they look like.
func FuzzParseQuotedValue(f *testing.F) {
	for _, s := range []string{"sensor-0042", "007", "1e3", "0x1f", "true", "null", "~", "2024-01-02", "a: b", "#x", "", " padded ", "é", "tok\"en"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !utf8.ValidString(s) {
			return
		}
		quoted, err := json.Marshal(s) // a JSON string is a YAML double-quoted scalar
		if err != nil {
			t.Fatal(err)
		}
		m, err := config.Parse([]byte("device_id: "+string(quoted)+"\n"), "agent.yaml")
		if err != nil {
			if printableASCII(s) {
				t.Fatalf("quoted value %s refused: %v", quoted, err)
			}
			return // YAML refuses some control characters
		}
		if got, ok := m["device-id"]; !ok || got != s {
			t.Fatalf("quoted value %s read back as %q (present %v)", quoted, got, ok)
		}
	})
}

// TestParseKeepsPlainScalarText: unquoted scalars keep their text, so a
// device whose ID is its serial number "007" does not enroll as "7".
func TestParseKeepsPlainScalarText(t *testing.T) {
	for _, v := range []string{"007", "0042", "1e3", "0x1f", "0o17", "2024-01-02", ".inf", "12345678901234567890123"} {
		m, err := config.Parse([]byte("device_id: "+v+"\n"), "agent.yaml")
		if err != nil || m["device-id"] != v {
			t.Errorf("device_id: %s read as %q, %v", v, m["device-id"], err)
		}
	}
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
