// Threadline's socket client for browsers and Node 20+: no runtime dependencies.
//
//   const client = connect({ url, token, clientId: 'web' });
//   for await (const e of client) render(e);
//
// See README.md.

import { ThreadlineClient, type ConnectOptions } from './client.js';

export { ThreadlineClient, socketUrl, tokenExpiry } from './client.js';
export type { ConnectOptions, State, TokenSource, WebSocketConstructor, WebSocketLike } from './client.js';
export { ThreadlineError, type ErrorKind } from './errors.js';
export * from './events.js';

/** Starts a client; it connects in the background. */
export function connect(options: ConnectOptions): ThreadlineClient {
  return new ThreadlineClient(options);
}
