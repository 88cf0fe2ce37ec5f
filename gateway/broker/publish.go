package broker

import (
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// OnPublish bounds what one device may publish: payloads up to maxPayload,
// and publishes at its session's rate. It runs on the publishing client's
// own reader goroutine after the ACL check, for every PUBLISH: the common
// path is one sync.Map load and one atomic token-bucket take (limit.Pacer),
// with no lock and no allocation; QoS 1/2 publishes pass the gate
// (backpressure.go). Services and the gateway's own publishes
// pass untouched.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || strings.HasPrefix(cl.ID, servicePrefix) {
		return pk, nil
	}
	if h.maxPayload > 0 && len(pk.Payload) > h.maxPayload {
		return pk, h.refusePublish(cl, pk, packets.ErrPacketTooLarge, "payload_too_large")
	}
	v, ok := h.devices.Load(cl)
	if !ok {
		return pk, nil
	}
	ds := v.(*deviceSession)
	if ds.pacer != nil {
		if wait := ds.pacer.Take(); wait > 0 {
			if err := h.pace(cl, wait); err != nil {
				return pk, err
			}
		}
	}
	if pk.FixedHeader.Qos > 0 {
		return pk, h.admit(cl, ds)
	}
	return pk, nil
}

// maxPaceStep bounds one sleep of a paced reader, so a session closed
// meanwhile (revoked, taken over) is noticed soon.
const maxPaceStep = 100 * time.Millisecond

// pace holds the session's reader until its bucket has a token again.
// The publish is delayed, never dropped: the reader stops reading, TCP flow
// control slows the sender, a QoS 1 publisher sees its PUBACKs later and a
// QoS 0 one blocks in its socket writes. The excess costs the gateway no CPU
// (the bytes wait in socket buffers) and no message is lost, so a flooding
// device slows only itself; other sessions have readers of their own.
func (h *hook) pace(cl *mqtt.Client, wait time.Duration) error {
	h.m.PublishesThrottled.Inc()
	flush(cl)
	for ; wait > 0; wait -= maxPaceStep {
		time.Sleep(min(wait, maxPaceStep))
		if cl.Closed() {
			return packets.ErrRejectPacket
		}
	}
	return nil
}

// refusePublish refuses one publish in the way the client's protocol
// allows. MQTT 5 with QoS 1 or 2: an acknowledgement with the reason code,
// and the session stays. MQTT 5 with QoS 0: there is no acknowledgement,
// so DISCONNECT with the reason code. MQTT 3.1.1 has no refusal of a
// publish at all: the connection is closed. The error tells mochi to drop
// the packet (mochi would otherwise forward a v3 publish despite an error,
// and log the whole packet at error level for a v5 one).
func (h *hook) refusePublish(cl *mqtt.Client, pk packets.Packet, code packets.Code, reason string) error {
	h.m.PublishRefusals.WithLabelValues(reason).Inc()
	if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0 {
		h.log.Debug("publish refused", "client", cl.ID, "topic", pk.TopicName, "reason", reason, "bytes", len(pk.Payload))
		ack := packets.Packet{
			FixedHeader: packets.FixedHeader{Type: packets.Puback},
			PacketID:    pk.PacketID,
			ReasonCode:  code.Code,
			Properties:  packets.Properties{ReasonString: code.Reason},
		}
		if pk.FixedHeader.Qos == 2 {
			ack.FixedHeader.Type = packets.Pubrec
		}
		_ = cl.WritePacket(ack)
		return packets.ErrRejectPacket
	}
	h.log.Info("session closed: publish refused", "client", cl.ID, "topic", pk.TopicName, "reason", reason, "bytes", len(pk.Payload))
	_ = h.srv.DisconnectClient(cl, code)
	return packets.ErrRejectPacket
}
