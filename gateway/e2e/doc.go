// Package e2e holds fleetgate's end-to-end tests: they build the real
// binaries, start a gateway process on loopback ports chosen at run time and
// drive it with the agent, the provisioning CLI, Go MQTT clients and, where
// installed, openssl, curl and the mosquitto clients.
package e2e
