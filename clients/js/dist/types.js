// The public types of the SDK besides the wire frames (those are in protocol.gen.ts).
// Type-only: nothing here exists at run time, so dist/index.js stays one self-contained file.
export {};
