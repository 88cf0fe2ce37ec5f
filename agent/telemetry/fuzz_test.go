package telemetry

import (
	"encoding/json"
	"strings"
	"testing"
)

// FuzzParseLine feeds arbitrary bytes to the local socket's line parser: it
// never panics, and what it accepts is one JSON object within the size
// limit, with a subtopic the gateway's topic ACL allows and no wildcard.
func FuzzParseLine(f *testing.F) {
	for _, s := range []string{
		`{"temp_c":21.5}`,
		`{"topic":"temp","data":{"c":1}}`,
		`{"topic":"a/b/c","data":{}}`,
		`{"topic":"+","data":{}}`,
		`{"topic":"a/#","data":{}}`,
		`{"topic":"","data":{}}`,
		`{"topic":5,"data":{}}`,
		`{"topic":"t","data":[1]}`,
		`{"topic":"t"}`,
		`{"a":1}{"b":2}`,
		`[1,2]`,
		`"str"`,
		`{`,
		`{"a":"\u0000"}`,
		"{\"topic\":\"a\u00e9\",\"data\":{}}",
		`{"topic":"t","data":{},"topic":"u"}`,
		`   {"a":1}   `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		m, err := ParseLine(line)
		if err != nil {
			return
		}
		if len(line) > MaxLineSize {
			t.Fatalf("accepted a line of %d bytes", len(line))
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(m.Data, &obj); err != nil {
			t.Fatalf("data %q is not an object: %v", m.Data, err)
		}
		if m.Subtopic != "" {
			if err := checkSubtopic(m.Subtopic); err != nil {
				t.Fatalf("accepted subtopic %q: %v", m.Subtopic, err)
			}
			if strings.ContainsAny(m.Subtopic, "+#\x00") || strings.HasPrefix(m.Subtopic, "/") {
				t.Fatalf("subtopic %q", m.Subtopic)
			}
		}
	})
}
