// The frames a Threadline socket delivers (docs/PROTOCOL.md): typed payloads for the
// three system event types and the six agent event types.

/** The free-form `data` object an agent sent with its event. */
export type AgentData = { [key: string]: unknown };

interface Frame<E extends string, D> {
  type: 'event';
  /** The user's own dense sequence: 1, 2, 3 … over every event of the user's threads. */
  user_seq: number;
  /** The global log position. */
  position: number;
  thread_id: string;
  /** Dense per thread. */
  thread_version: number;
  /** The run, for run and agent events. */
  run_id: string | null;
  event: E;
  data: D;
  event_id: string;
  /** RFC 3339 UTC with milliseconds. */
  recorded_at: string;
  /** A merged frame (`merge`, streamed messages) covers `from_user_seq..=user_seq`. */
  from_user_seq?: number;
  /** …and `from_thread_version..=thread_version`. */
  from_thread_version?: number;
}

export type ThreadCreated = Frame<'thread_created', { title: string | null; metadata: unknown }>;
export type RunRegistered = Frame<'run_registered', { agent_name: string }>;
/** The run was idle past the server's TTL. */
export type RunExpired = Frame<'run_expired', Record<string, never>>;
export type AgentStarted = Frame<'agent_started', AgentData>;
export type AgentThinking = Frame<'agent_thinking', AgentData>;
export type ToolExecuting = Frame<'tool_executing', AgentData & { tool_call_id?: string }>;
export type ToolCompleted = Frame<'tool_completed', AgentData & { tool_call_id?: string }>;
/** Terminal. */
export type AgentCompleted = Frame<'agent_completed', AgentData>;
/** Terminal. */
export type AgentError = Frame<'agent_error', AgentData>;

/** A streamed message opened (its seq 0). */
export type MessageStarted = Frame<'message_started', { message_id: string }>;
/** Deltas of a message: one (`seq`), or merged (`from_seq..=seq`, `from_seq` 0 when the
 *  frame also covers its start); append `text`. */
export type MessageDelta = Frame<
  'message_delta',
  { message_id: string; seq: number; text: string; from_seq?: number }
>;
/** The message is complete: `seq` deltas, `bytes` of text; a merged one carries `text`. */
export type MessageCompleted = Frame<
  'message_completed',
  { message_id: string; seq: number; bytes: number; text?: string; from_seq?: number }
>;
export type MessageEvent = MessageStarted | MessageDelta | MessageCompleted;

/** A streamed message as the client has accumulated it. */
export interface MessageText {
  message_id: string;
  run_id: string | null;
  /** What this frame added. */
  delta: string;
  /** Everything received so far, `delta` included. */
  text: string;
  seq: number;
  complete: boolean;
  /** The client joined after the message began and has only its tail. */
  partial: boolean;
}

export type SystemEvent = ThreadCreated | RunRegistered | RunExpired;
export type AgentEvent =
  | AgentStarted
  | AgentThinking
  | ToolExecuting
  | ToolCompleted
  | AgentCompleted
  | AgentError;

/** One event of the user's threads; switch on `event` to narrow `data`. */
export type ThreadlineEvent = SystemEvent | AgentEvent | MessageEvent;

export type EventType = ThreadlineEvent['event'];

export const SYSTEM_EVENT_TYPES: readonly SystemEvent['event'][] = [
  'thread_created',
  'run_registered',
  'run_expired',
];

export const AGENT_EVENT_TYPES: readonly AgentEvent['event'][] = [
  'agent_started',
  'agent_thinking',
  'tool_executing',
  'tool_completed',
  'agent_completed',
  'agent_error',
];

/** Whether an event ends its run. */
export function isTerminal(e: ThreadlineEvent): boolean {
  return e.event === 'agent_completed' || e.event === 'agent_error' || e.event === 'run_expired';
}
