//! What the bench reads from `/proc`: CPU seconds and peak RSS of a process, the process
//! listening on a loopback port (the broker's and Redis's pids, for their CPU per job), and
//! the machine's busy CPU time (what else ran during a measurement).

/// CPU seconds (user + system) and peak RSS (`VmHWM`) in bytes of process `pid`.
pub fn usage(pid: u32) -> Option<(f64, u64)> {
    Some((cpu_seconds(pid)?, peak_rss(pid)?))
}

/// CPU seconds (user + system) of process `pid`, all its threads.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

/// `VmHWM` of process `pid` in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// `USER_HZ`: 100 on every Linux this runs on (the kernel's ABI for `/proc/*/stat`).
fn clock_ticks() -> f64 {
    100.0
}

/// (busy, total) CPU seconds of the whole machine since boot (`/proc/stat`, first line):
/// busy is everything but idle and iowait.
pub fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some(((total - idle) / clock_ticks(), total / clock_ticks()))
}

/// The port of a `scheme://host:port` URL whose host is a loopback address (the servers
/// whose CPU the bench can read), else `None`.
pub fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', ',']).next()?;
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let (host, port) = hostport.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
        .then(|| port.parse().ok())
        .flatten()
}

/// The process with a socket listening on TCP `port` (IPv4 or IPv6), found through the
/// socket's inode in `/proc/net/tcp*` and the open descriptors under `/proc/<pid>/fd`.
pub fn listening_pid(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| listening_inode(line, port))
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && wanted.iter().any(|w| link.as_os_str() == w.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// The inode of a `/proc/net/tcp` line when it is a socket listening on `port`.
fn listening_inode(line: &str, port: u16) -> Option<String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
    (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|s| s.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ports_of_urls() {
        assert_eq!(loopback_port("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(loopback_port("redis://localhost:6379/0"), Some(6379));
        assert_eq!(loopback_port("redis://:pw@127.0.0.1:6380"), Some(6380));
        assert_eq!(loopback_port("nats://broker.example:4222"), None);
        assert_eq!(loopback_port("nats://127.0.0.1"), None);
    }

    #[test]
    fn a_listening_socket_is_found_and_a_connected_one_is_not() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        let listen = "   0: 0100007F:107E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0";
        let conn = "   1: 0100007F:107E 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_inode(header, 4222), None);
        assert_eq!(listening_inode(listen, 4222).as_deref(), Some("31337"));
        assert_eq!(listening_inode(listen, 4223), None);
        assert_eq!(listening_inode(conn, 4222), None);
    }

    #[test]
    fn this_process_is_found_listening_on_its_own_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listening_pid(port), Some(std::process::id()));
        assert!(cpu_seconds(std::process::id()).is_some());
        let (busy, total) = machine_cpu().unwrap();
        assert!(busy > 0.0 && total >= busy);
    }
}
