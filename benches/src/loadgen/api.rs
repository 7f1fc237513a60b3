//! A small HTTP/1.1 client for the host's REST API: keep-alive connections in a pool, a
//! bearer token, JSON in and out. Each request holds one connection for its duration; the
//! pool grows to as many connections as requests run at once.

use std::net::SocketAddr;
use std::sync::Mutex;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use viworks_core::wire::CommandId;

use super::LoadgenError;

/// Keep-alive connections kept for reuse; more are closed after use.
const MAX_IDLE: usize = 1024;

/// The API of one host.
#[derive(Debug)]
pub struct Api {
    addr: SocketAddr,
    token: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// What a submission returned: the job and one command id per target, in the API's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    /// The job's id.
    pub job_id: String,
    /// The commands.
    pub commands: Vec<CommandId>,
}

impl Api {
    /// A client of the API at `addr` using `token`.
    pub fn new(addr: SocketAddr, token: String) -> Api {
        Api { addr, token, idle: Mutex::new(Vec::new()) }
    }

    async fn connection(&self) -> Result<SendRequest<Full<Bytes>>, LoadgenError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            match idle {
                Some(sender) if !sender.is_closed() => return Ok(sender),
                Some(_) => continue,
                None => break,
            }
        }
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|source| LoadgenError::ApiConnect { addr: self.addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| LoadgenError::Http { what: "handshake".into(), source })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn release(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push(sender);
        }
    }

    /// One request on a pooled connection: its status and raw body. `authorized` adds the
    /// bearer token and the JSON content type.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        authorized: bool,
    ) -> Result<(u16, Bytes), LoadgenError> {
        let what = format!("{method} {path}");
        let mut sender = self.connection().await?;
        sender.ready().await.map_err(|source| LoadgenError::Http { what: what.clone(), source })?;
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, self.addr.to_string());
        if authorized {
            request = request
                .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
                .header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(bytes)).map_err(|e| LoadgenError::Api {
            what: what.clone(),
            status: 0,
            body: e.to_string(),
        })?;
        let response =
            sender.send_request(request).await.map_err(|source| LoadgenError::Http { what: what.clone(), source })?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| LoadgenError::Http { what: what.clone(), source })?
            .to_bytes();
        self.release(sender);
        Ok((status, body))
    }

    /// Sends one request and reads the whole answer: its status and its JSON body (`null`
    /// when empty or not JSON).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(u16, Value), LoadgenError> {
        let (status, body) = self.exchange(method, path, body, true).await?;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// `POST /api/v1/commands` with `body`; fails unless the API answers 202 with a job.
    pub async fn submit(&self, body: &Value) -> Result<Submission, LoadgenError> {
        let (status, answer) = self.call(Method::POST, "/api/v1/commands", Some(body)).await?;
        let unexpected =
            |answer: &Value| LoadgenError::Api { what: "POST /api/v1/commands".into(), status, body: shorten(answer) };
        if status != 202 {
            return Err(unexpected(&answer));
        }
        let job_id = answer.get("job_id").and_then(Value::as_str).ok_or_else(|| unexpected(&answer))?.to_owned();
        let commands = answer
            .get("commands")
            .and_then(Value::as_array)
            .ok_or_else(|| unexpected(&answer))?
            .iter()
            .map(|c| c.get("command_id").and_then(Value::as_str).and_then(|id| CommandId::new(id).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| unexpected(&answer))?;
        Ok(Submission { job_id, commands })
    }
}

/// A histogram's running sum and count from the host's `/metrics`, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SumCount {
    /// The sum of the observations.
    pub sum: f64,
    /// How many there were.
    pub count: f64,
}

impl SumCount {
    /// The mean of the observations made between `earlier` and `self`.
    pub fn mean_since(&self, earlier: &SumCount) -> Option<std::time::Duration> {
        let count = self.count - earlier.count;
        let sum = self.sum - earlier.sum;
        (count > 0.0 && sum >= 0.0).then(|| std::time::Duration::from_secs_f64(sum / count))
    }
}

impl Api {
    /// The sum and count of histogram `name` (as exposed, e.g.
    /// `viworks_result_store_seconds`) from `GET /metrics`.
    pub async fn histogram(&self, name: &str) -> Result<SumCount, LoadgenError> {
        let text = self.text("/metrics").await?;
        let value = |suffix: &str| {
            let key = format!("{name}{suffix}");
            text.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(key.as_str())).then(|| fields.next()?.parse::<f64>().ok()).flatten()
            })
        };
        match (value("_sum"), value("_count")) {
            (Some(sum), Some(count)) => Ok(SumCount { sum, count }),
            _ => {
                Err(LoadgenError::Api { what: format!("GET /metrics ({name})"), status: 200, body: "not found".into() })
            }
        }
    }

    /// The number of agents the host has a live session with, from `GET /internal/_healthz`.
    pub async fn online(&self) -> Result<u64, LoadgenError> {
        let (status, health) = self.call(Method::GET, "/internal/_healthz", None).await?;
        health.pointer("/components/agents/online").and_then(Value::as_u64).ok_or_else(|| LoadgenError::Api {
            what: "GET /internal/_healthz".into(),
            status,
            body: shorten(&health),
        })
    }

    async fn text(&self, path: &str) -> Result<String, LoadgenError> {
        let (status, body) = self.exchange(Method::GET, path, None, false).await?;
        let what = format!("GET {path}");
        if status != 200 {
            return Err(LoadgenError::Api { what, status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The first 300 characters of a JSON answer, for error messages.
pub fn shorten(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}
