// Sends usage events to a tally-sidecar with the real OpenMeter JavaScript SDK (@openmeter/sdk,
// pinned in package.json). Driven by tests/tests/js_sdk.rs:
//
//   node send_with_sdk.mjs <node_modules> <sidecar url> <token> <id prefix>
//
// 1. one event (`events.ingest(event)`; the SDK sends it as a one-element array),
// 2. a batch of three (`events.ingest([...])`), one without an id or source, so the SDK's
//    defaults are used.
// The SDK throws on any answer but 2xx, which fails the script. On success it prints one JSON
// document with what went over the wire: {"requests": [{"contentType", "authorization", "body"}]}.

import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const [modules, url, token, prefix] = process.argv.slice(2)
const { OpenMeter } = await import(
  pathToFileURL(join(modules, '@openmeter/sdk/dist/index.js')).href
)

const sent = []
const recordingFetch = async (request) => {
  const body = await request.clone().text()
  sent.push({
    contentType: request.headers.get('content-type'),
    authorization: request.headers.get('authorization'),
    body: JSON.parse(body),
  })
  return fetch(request)
}

const openmeter = new OpenMeter({ baseUrl: url, apiKey: token, fetch: recordingFetch })
const event = (n, extra = {}) => ({
  id: `${prefix}-${n}`,
  source: 'tally-tests/js-sdk',
  type: 'api-calls',
  subject: 'customer-js',
  time: new Date('2026-12-03T10:00:00Z'),
  data: { calls: n, route: '/v1/things' },
  ...extra,
})

await openmeter.events.ingest(event(1))
await openmeter.events.ingest([event(2), event(3), { type: 'api-calls', subject: 'customer-js', data: { calls: 4 } }])
process.stdout.write(JSON.stringify({ requests: sent }) + '\n')
