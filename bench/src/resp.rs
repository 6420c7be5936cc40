//! A tiny RESP2 client for the Redis peer: commands out, replies in, nothing
//! more. Hand-rolled because the bench needs only XADD (pipelined), XREAD,
//! PING and INFO, and the `redis` crate would double the dependency tree of
//! this tool for that.

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

/// One RESP2 reply.
#[derive(Debug, Clone)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(#[allow(dead_code)] i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Appends one command (an array of bulk strings) to `buf`.
pub fn encode(buf: &mut Vec<u8>, args: &[&[u8]]) {
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// One connection to redis-server.
#[derive(Debug)]
pub struct Conn {
    io: BufStream<TcpStream>,
    line: String,
}

impl Conn {
    pub async fn connect(port: u16) -> Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .context("connecting to redis-server")?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            io: BufStream::new(stream),
            line: String::new(),
        })
    }

    /// Writes already encoded commands and flushes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// One command, one reply; a Redis error reply is an `Err`.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply> {
        let mut buf = Vec::new();
        encode(&mut buf, args);
        self.send_raw(&buf).await?;
        match self.read().await? {
            Reply::Error(e) => bail!("redis: {e}"),
            r => Ok(r),
        }
    }

    /// Reads `n` replies (of a pipeline), failing on the first error reply.
    pub async fn read_ok(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            if let Reply::Error(e) = self.read().await? {
                bail!("redis: {e}");
            }
        }
        Ok(())
    }

    pub async fn read(&mut self) -> Result<Reply> {
        Box::pin(self.read_inner()).await
    }

    async fn read_inner(&mut self) -> Result<Reply> {
        self.line.clear();
        if self.io.read_line(&mut self.line).await? == 0 {
            bail!("redis closed the connection");
        }
        let line = self.line.trim_end_matches("\r\n").to_owned();
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(rest.parse()?),
            "$" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; n as usize + 2];
                    self.io.read_exact(&mut buf).await?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let n: i64 = rest.parse()?;
                if n < 0 {
                    Reply::Array(None)
                } else {
                    let mut items = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        items.push(Box::pin(self.read_inner()).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            other => bail!("unexpected RESP type {other:?}"),
        })
    }
}

impl Reply {
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Reply::Bulk(Some(b)) => b,
            Reply::Simple(s) => s.as_bytes(),
            _ => &[],
        }
    }
}

/// The entries of an `XREAD`/`XRANGE` reply as `(id, value of the first field)`.
pub fn entries(reply: &Reply, from_xread: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let list: Vec<&Reply> = if from_xread {
        reply
            .items()
            .iter()
            .flat_map(|stream| stream.items().get(1).map(|e| e.items()).unwrap_or(&[]))
            .collect()
    } else {
        reply.items().iter().collect()
    };
    list.into_iter()
        .map(|e| {
            let id = e
                .items()
                .first()
                .map(|r| r.bytes().to_vec())
                .unwrap_or_default();
            let value = e
                .items()
                .get(1)
                .and_then(|f| f.items().get(1))
                .map(|r| r.bytes().to_vec())
                .unwrap_or_default();
            (id, value)
        })
        .collect()
}
