// Proof of work for a new identity, off the main thread: find a decimal nonce such that
// SHA-256(challenge || nonce) starts with `difficulty` zero bits (as csml.client.pow does).

const encoder = new TextEncoder();
const BATCH = 2048;

function leadingZeroBits(bytes) {
  let bits = 0;
  for (const b of bytes) {
    if (b === 0) {
      bits += 8;
      continue;
    }
    return bits + Math.clz32(b) - 24;
  }
  return bits;
}

self.onmessage = async (event) => {
  const { challenge, difficulty } = event.data;
  if (difficulty <= 0) {
    self.postMessage({ done: true, nonce: "0", tried: 0 });
    return;
  }
  const expected = 2 ** difficulty;
  let start = 0;
  for (;;) {
    const digests = [];
    for (let n = start; n < start + BATCH; n++) {
      digests.push(crypto.subtle.digest("SHA-256", encoder.encode(challenge + n)));
    }
    const results = await Promise.all(digests);
    for (let i = 0; i < results.length; i++) {
      if (leadingZeroBits(new Uint8Array(results[i])) >= difficulty) {
        self.postMessage({ done: true, nonce: String(start + i), tried: start + i + 1 });
        return;
      }
    }
    start += BATCH;
    self.postMessage({ done: false, tried: start, expected });
  }
};
