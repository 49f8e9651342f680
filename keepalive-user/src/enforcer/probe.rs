//! Whether any established connection can match a rule change's keys,
//! before a walk of the rules iterator: one sock_diag dump per family with
//! a bytecode filter (as `ss` sends), which the kernel runs on each socket
//! under its hash bucket's lock, about 30 ns a socket. The rules iterator
//! locks each socket and runs a program on it: 0.45 µs a socket. A change
//! that no live connection can match then costs no walk at all.
//!
//! The filter is a superset: it checks the ports and an IPv4 prefix (an
//! IPv6 prefix is left out: a short one also matches IPv4-mapped
//! addresses, which sock_diag's IPv6 condition does not), not the cgroup.
//! Any doubt (too many keys, a key that matches every connection, an
//! error) means "walk".
use keepalive_common::rules::{RuleKey, PORTS_PREFIX_LEN};

use crate::destroy::{Diag, NLMSG_ERROR, NLM_F_REQUEST, SOCK_DIAG_BY_FAMILY};

/// The older request (`struct inet_diag_req`): one dump covers both
/// families (the kernel asks for `AF_UNSPEC`), one walk of the table.
const TCPDIAG_GETSOCK: u16 = 18;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `TCP_ESTABLISHED` as a state bit.
const ESTABLISHED: u32 = 1 << 1;

/// `INET_DIAG_BC_*` (linux/inet_diag.h).
const BC_JMP: u8 = 1;
const BC_D_COND: u8 = 8;
const BC_S_EQ: u8 = 11;
const BC_D_EQ: u8 = 12;

/// Keys beyond which the filter is not built (a jump is 16 bits; a long
/// filter costs the kernel more per socket than it saves): walk.
const MAX_KEYS: usize = 256;

/// One condition: its code and what follows the 4-byte op.
struct Cond {
    code: u8,
    body: Vec<u8>,
}

impl Cond {
    fn len(&self) -> usize {
        4 + self.body.len()
    }
}

/// A port comparison: the port in the `no` field of a second op.
fn port(code: u8, port: u16) -> Cond {
    let mut body = vec![0, 0];
    body.extend_from_slice(&port.to_ne_bytes());
    Cond { code, body }
}

/// The conditions of one key (all must hold); `None` when the key
/// matches every connection.
fn conditions(len: u32, k: &RuleKey) -> Option<Vec<Cond>> {
    let mut conds = Vec::new();
    if k.local_port != 0 {
        conds.push(port(BC_S_EQ, k.local_port));
    }
    if k.remote_port != 0 {
        conds.push(port(BC_D_EQ, k.remote_port));
    }
    let prefix = len.saturating_sub(PORTS_PREFIX_LEN);
    let mapped = k.addr[..10].iter().all(|b| *b == 0) && k.addr[10] == 0xff && k.addr[11] == 0xff;
    if prefix >= 96 && mapped {
        // `struct inet_diag_hostcond`: family, prefix, 2 bytes of padding,
        // port (-1: any), the IPv4 address.
        let mut body = vec![libc::AF_INET as u8, (prefix - 96) as u8, 0, 0];
        body.extend_from_slice(&(-1i32).to_ne_bytes());
        body.extend_from_slice(&k.addr[12..16]);
        conds.push(Cond {
            code: BC_D_COND,
            body,
        });
    }
    (!conds.is_empty()).then_some(conds)
}

/// The filter: the keys' conditions, one block each, OR'ed: a condition
/// that fails goes to the next block (past the end, a reject, after the
/// last); a block that holds jumps to the end (an accept).
fn bytecode(keys: &[(u32, RuleKey)]) -> Option<Vec<u8>> {
    let blocks: Vec<Vec<Cond>> = keys
        .iter()
        .map(|(len, k)| conditions(*len, k))
        .collect::<Option<_>>()?;
    let last = blocks.len().checked_sub(1)?;
    let sizes: Vec<usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| b.iter().map(Cond::len).sum::<usize>() + if i < last { 4 } else { 0 })
        .collect();
    let total: usize = sizes.iter().sum();
    if total + 4 > usize::from(u16::MAX) {
        return None;
    }
    let mut out = Vec::with_capacity(total);
    let mut block_start = 0;
    for (i, block) in blocks.iter().enumerate() {
        let next_block = block_start + sizes[i];
        for c in block {
            let here = out.len();
            let no = if i < last {
                next_block - here
            } else {
                total - here + 4
            };
            out.extend_from_slice(&[c.code, c.len() as u8]);
            out.extend_from_slice(&(no as u16).to_ne_bytes());
            out.extend_from_slice(&c.body);
        }
        if i < last {
            let here = out.len();
            out.extend_from_slice(&[BC_JMP, 4]);
            out.extend_from_slice(&((total - here) as u16).to_ne_bytes());
        }
        block_start = next_block;
    }
    debug_assert_eq!(out.len(), total);
    Some(out)
}

#[derive(Clone, Copy)]
/// What one dump asks: `family` (`None`: the older request, both), the
/// ports the kernel checks before any filter (one key's), and the filter.
struct Query<'a> {
    family: Option<i32>,
    sport: u16,
    dport: u16,
    filter: Option<&'a [u8]>,
}

/// `nlmsghdr` + `inet_diag_req_v2` or `inet_diag_req` (established TCP
/// sockets) + the filter.
fn request(q: &Query) -> Vec<u8> {
    let attr_len = q.filter.map_or(0, |f| 4 + f.len());
    let body = if q.family.is_some() { 56 } else { 60 };
    let len = 16 + body + attr_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    let kind = if q.family.is_some() {
        SOCK_DIAG_BY_FAMILY
    } else {
        TCPDIAG_GETSOCK
    };
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid
                                              // `struct inet_diag_sockid`: ports (network order), any addresses,
                                              // interface and cookie.
    let mut id = [0u8; 48];
    id[0..2].copy_from_slice(&q.sport.to_be_bytes());
    id[2..4].copy_from_slice(&q.dport.to_be_bytes());
    match q.family {
        Some(family) => {
            m.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
            m.extend_from_slice(&ESTABLISHED.to_ne_bytes());
            m.extend_from_slice(&id);
        }
        None => {
            // family, src_len, dst_len, ext; id; states; dbs.
            m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
            m.extend_from_slice(&id);
            m.extend_from_slice(&ESTABLISHED.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
        }
    }
    if let Some(f) = q.filter {
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        m.extend_from_slice(f);
    }
    m
}

/// Whether one dump finds a socket: stops at the first.
fn finds(q: &Query) -> std::io::Result<bool> {
    let diag = Diag::open()?;
    diag.send(&request(q))?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = diag.recv(&mut buf, 0)?;
        let mut at = 0;
        if n == 0 {
            return Ok(false);
        }
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            match kind {
                // A socket (the older request's replies carry its type).
                SOCK_DIAG_BY_FAMILY | TCPDIAG_GETSOCK => return Ok(true),
                NLMSG_DONE => return Ok(false),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(
                        buf.get(at + 16..at + 20)
                            .and_then(|b| b.try_into().ok())
                            .unwrap_or([0; 4]),
                    );
                    return Err(std::io::Error::from_raw_os_error(code.abs()));
                }
                _ => {}
            }
            if len < 16 {
                return Err(std::io::Error::other("a malformed netlink reply"));
            }
            at += (len + 3) & !3;
        }
    }
}

/// Whether an established connection in this network namespace may match
/// one of `keys`: false only when the kernel says none does.
pub(super) fn may_match(keys: &[(u32, RuleKey)]) -> bool {
    if keys.len() > MAX_KEYS {
        return true;
    }
    let Some(filter) = bytecode(keys) else {
        return true;
    };
    // One key's ports go in the request: the kernel compares them before
    // it reads more of the socket; the filter is left out when they are
    // all it says.
    let (sport, dport, filter) = match keys {
        [(len, k)] => {
            let ports_only =
                conditions(*len, k).is_some_and(|c| c.iter().all(|c| c.code != BC_D_COND));
            (
                k.local_port,
                k.remote_port,
                (!ports_only).then_some(&filter[..]),
            )
        }
        _ => (0, 0, Some(&filter[..])),
    };
    let both = Query {
        family: None,
        sport,
        dport,
        filter,
    };
    match finds(&both) {
        Ok(found) => found,
        // A kernel without the older request: one dump per family.
        Err(_) => [libc::AF_INET, libc::AF_INET6].into_iter().any(|family| {
            finds(&Query {
                family: Some(family),
                ..both
            })
            .unwrap_or(true)
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::rule::{Cidr, RuleMatch};

    fn key(local: Option<u16>, remote: Option<u16>, cidr: Option<&str>) -> (u32, RuleKey) {
        RuleMatch {
            local_port: local,
            remote_port: remote,
            remote: cidr.map(|c| c.parse::<Cidr>().unwrap()),
        }
        .key()
    }

    #[test]
    fn the_filter_is_laid_out_as_the_kernel_reads_it() {
        // One block of one port: the op's `no` rejects (past the end).
        let b = bytecode(&[key(Some(5060), None, None)]).unwrap();
        assert_eq!(b.len(), 8);
        assert_eq!(
            (b[0], b[1], u16::from_ne_bytes([b[2], b[3]])),
            (BC_S_EQ, 8, 12)
        );
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 5060);
        // Two blocks: the first's failure goes to the second, its success
        // jumps to the end.
        let b = bytecode(&[
            key(Some(5060), None, Some("10.0.0.0/8")),
            key(None, Some(5061), None),
        ])
        .unwrap();
        // 8 (port) + 16 (IPv4 prefix) + 4 (jump) + 8 (port).
        assert_eq!(b.len(), 36);
        assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 28, "to the second block");
        assert_eq!(
            (b[8], b[9], u16::from_ne_bytes([b[10], b[11]])),
            (BC_D_COND, 16, 20)
        );
        assert_eq!((b[12], b[13]), (libc::AF_INET as u8, 8));
        assert_eq!(&b[20..24], &[10, 0, 0, 0]);
        assert_eq!(
            (b[24], b[25], u16::from_ne_bytes([b[26], b[27]])),
            (BC_JMP, 4, 12)
        );
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 12, "reject");
        // A key for every connection: no filter.
        assert!(bytecode(&[key(None, None, None)]).is_none());
        // An IPv6 prefix alone: no condition either (a superset).
        assert!(bytecode(&[key(None, None, Some("2001:db8::/32"))]).is_none());
    }

    /// Each form of the request: the older one for both families, and one
    /// per family.
    fn finds_each_way(keys: &[(u32, RuleKey)]) -> [bool; 3] {
        let filter = bytecode(keys).unwrap();
        let q = |family| Query {
            family,
            sport: 0,
            dport: 0,
            filter: Some(&filter[..]),
        };
        [
            finds(&q(None)).unwrap(),
            finds(&q(Some(libc::AF_INET))).unwrap(),
            finds(&q(Some(libc::AF_INET6))).unwrap(),
        ]
    }

    #[test]
    fn each_request_form_filters_alike() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        assert_eq!(
            finds_each_way(&[key(Some(port), None, None)]),
            [true, true, false]
        );
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let unused = free.local_addr().unwrap().port();
        drop(free);
        assert_eq!(finds_each_way(&[key(Some(unused), None, None)]), [false; 3]);
    }

    #[test]
    fn the_kernel_finds_what_the_filter_says() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let unused = free.local_addr().unwrap().port();
        drop(free);
        assert!(may_match(&[key(Some(port), None, None)]));
        assert!(may_match(&[key(None, Some(port), Some("127.0.0.0/8"))]));
        assert!(may_match(&[
            key(Some(unused), None, None),
            key(Some(peer.port()), None, Some("127.0.0.1")),
        ]));
        assert!(!may_match(&[key(Some(unused), None, None)]));
        assert!(!may_match(&[key(None, Some(port), Some("10.0.0.0/8"))]));
        assert!(!may_match(&[
            key(Some(unused), None, None),
            key(None, Some(unused), Some("127.0.0.1")),
        ]));
    }
}
