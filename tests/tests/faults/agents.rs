//! Agents stopping under load. kill -9 of one of three agents, twenty times at random moments,
//! each restarted: the jobs it held are redelivered after their lease, run elsewhere, and none
//! is lost, run twice at once, or left holding a lock. SIGTERM during a job: the agent drains,
//! or hands the job back at its deadline.

use std::time::Duration;

use rand::Rng;

use infraflux_tests::wait_for;

use crate::{Lab, Load, SERIAL, assert_nothing_lost};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_twenty_times_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start(3).await;
    let load = Load::start(&lab).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rng = rand::rng();
    for _ in 0..20 {
        let victim = rng.random_range(0..lab.agents());
        lab.kill9(victim);
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        lab.spawn(victim);
        lab.wait_ready(victim, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
    }
    let sent = load.stop().await;
    for i in 0..lab.agents() {
        assert!(lab.is_running(i));
    }
    assert_nothing_lost(&lab, &sent, Duration::from_secs(120)).await;
}

/// SIGTERM of each agent while it runs a job, twice round: first with the default
/// `shutdown_timeout` (the agent drains: its jobs finish before it exits), then with 1 s,
/// shorter than the jobs (it hands them back at the deadline and they finish elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_agents_during_jobs_under_load_drains_or_hands_back_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start(3).await;
    // The first round stops the agents started with the default; their restarts, stopped in
    // the second round, have 1 s.
    lab.set_env("INFRAFLUX_AGENT__SHUTDOWN_TIMEOUT", "1s");
    let load = Load::start(&lab).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for round in 0..2 * lab.agents() {
        let victim = round % lab.agents();
        let drains = round < lab.agents();
        let running = wait_for(
            Duration::from_secs(20),
            &format!("fault-{victim} to run a job"),
            || async {
                let running = lab.running_on(victim);
                (!running.is_empty()).then_some(running)
            },
        )
        .await;
        let asked = std::time::Instant::now();
        let code = lab.sigterm(victim, Duration::from_secs(30));
        let took = asked.elapsed();
        assert_eq!(
            code,
            Some(0),
            "fault-{victim} after SIGTERM (round {round}); its output ends:\n{}",
            lab.log_tail(victim, 40)
        );
        let unfinished: Vec<String> = running
            .iter()
            .filter(|stem| !lab.markers.join(format!("{stem}.done")).exists())
            .cloned()
            .collect();
        if drains {
            assert!(
                unfinished.is_empty(),
                "fault-{victim} exited before its jobs finished: {unfinished:?}"
            );
        } else {
            // With 2 s jobs and a 1 s deadline, the job running at SIGTERM is handed back.
            assert!(
                took < Duration::from_secs(5),
                "fault-{victim} took {took:?} to exit with shutdown_timeout = 1s; its output ends:\n{}",
                lab.log_tail(victim, 40)
            );
        }
        eprintln!(
            "round {round}: fault-{victim} {} and exited in {took:?}; {} of {} jobs unfinished",
            if drains { "drained" } else { "handed back" },
            unfinished.len(),
            running.len()
        );
        lab.spawn(victim);
        lab.wait_ready(victim, Duration::from_secs(60)).await;
    }
    let sent = load.stop().await;
    assert_nothing_lost(&lab, &sent, Duration::from_secs(120)).await;
}
