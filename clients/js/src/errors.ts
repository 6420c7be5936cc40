// What can go wrong, as the client reports it. Most errors are reported and then
// handled (the client reconnects); `fatal` ones close the client.

export type ErrorKind =
  /** A frame skipped user_seqs; nothing of it was delivered; resumes after the last good one. */
  | 'gap'
  /** A frame repeated a user_seq already delivered; dropped; resumes after the last good one. */
  | 'duplicate'
  /** With a thread filter: thread_version is not the next one. */
  | 'version_gap'
  /** The server's welcome resumed elsewhere than asked. */
  | 'resume_mismatch'
  /** caught_up named a user_seq beyond the last event sent. */
  | 'caught_up_beyond'
  /** An error frame that did not end the connection (e.g. invalid_token for a refresh). */
  | 'server'
  /** The server closed the connection. */
  | 'closed'
  /** The connection could not be opened, or broke. */
  | 'connection'
  /** Nothing came back in time: the connection is presumed dead. */
  | 'timeout'
  /** The token provider failed. */
  | 'token'
  /** The server refused the token (fatal for a fixed token or after repeated refusals). */
  | 'unauthorized'
  /** A fixed token expired. */
  | 'token_expired'
  /** The server refused the query (4400), e.g. `after` beyond the user's head. */
  | 'bad_request'
  /** The options cannot work. */
  | 'config'
  /** An ack was refused by the server, so a flush could not confirm it. */
  | 'ack_refused'
  /** A filtered connection dropped before the ack was confirmed. */
  | 'flush_interrupted'
  /** The client was closed. */
  | 'client_closed';

const FATAL: ReadonlySet<ErrorKind> = new Set<ErrorKind>([
  'unauthorized',
  'token_expired',
  'bad_request',
  'config',
  'client_closed',
]);

export class ThreadlineError extends Error {
  readonly kind: ErrorKind;
  /** The client gives up after this error. */
  readonly fatal: boolean;
  /** For gap / duplicate / version_gap: what was expected and what came. */
  readonly expected?: number;
  readonly got?: number;
  /** The user_seq the client resumes after. */
  readonly resumeAfter?: number;
  /** For closed: the close code; for server: the error frame's code. */
  readonly code?: number | string;

  constructor(
    kind: ErrorKind,
    message: string,
    extra: { expected?: number; got?: number; resumeAfter?: number; code?: number | string } = {},
  ) {
    super(message);
    this.name = 'ThreadlineError';
    this.kind = kind;
    this.fatal = FATAL.has(kind);
    this.expected = extra.expected;
    this.got = extra.got;
    this.resumeAfter = extra.resumeAfter;
    this.code = extra.code;
  }
}
