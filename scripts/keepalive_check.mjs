// Requests from Node's fetch (undici), as Immich's server sends them, after idle gaps near a server's keep-alive:
// a request sent on a connection the server is closing fails ("other side closed", EPIPE) and Immich drops its job.
//   node scripts/keepalive_check.mjs http://127.0.0.1:3003/ 2000,3000,5000 [requests per gap] [model]
// Only 127.0.0.1 or a host you name; a search per request (the text tower must be installed or fetchable).
const [base, gapList, count = "8", model = "ViT-B-32__openai"] = process.argv.slice(2);
if (!base || !gapList) {
  console.error("usage: node scripts/keepalive_check.mjs URL GAPS_MS[,GAPS_MS...] [REQUESTS] [MODEL]");
  process.exit(2);
}
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const result = {};
for (const gap of gapList.split(",").map(Number)) {
  const tally = (result[gap] = { ok: 0, failed: 0, why: {} });
  const fail = (why) => {
    tally.why[why] = (tally.why[why] || 0) + 1;
    tally.failed++;
  };
  for (let i = 0; i < Number(count); i++) {
    const form = new FormData();
    form.append("entries", JSON.stringify({ clip: { textual: { modelName: model } } }));
    form.append("text", `a cat ${i}`);
    try {
      const response = await fetch(new URL("predict", base), { method: "POST", body: form });
      await response.arrayBuffer();
      if (response.ok) tally.ok++;
      else fail(`status ${response.status}`);
    } catch (error) {
      fail(String(error.cause?.message || error.message));
    }
    await sleep(gap);
  }
}
console.log(JSON.stringify(result));
