// Wire additions of issue 10 (signal and chat relay, `media.provider = "p2p"`,
// `welcome.max_signal_bytes`) that the gateway side is adding to protocol/schemas right now.
// Written by hand from the agreed spec until those schemas land; then they come out of
// protocol.gen.ts and this file goes.
export {};
